"""Linear and chunked-recurrent attention: kernel feature maps, decayed scans, learned
feature maps, low-rank agents and landmarks — O(N) in the sequence length, most of them
decoding with a constant-size state."""

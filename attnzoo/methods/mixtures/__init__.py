"""Head-level and adaptive attention: mechanisms that reshape each head's weights with a
few learnable per-head quantities — Gaussian adaptive attention (GAAM: a learnable mean
offset and variance scale per head turn each row of scores into a Gaussian density) and
relative convolutional multi-head attention (RCMHA: depth-wise convolutions on Q, K, V
plus Transformer-XL relative positions). The head mixtures that work over *any* method
(Mixture-of-Head, soft mixtures of attention experts with shared K/V, EchoAtt's
cross-layer sharing) are layers: :mod:`attnzoo.layers.mixtures`."""

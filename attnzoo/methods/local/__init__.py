"""Local attention: sliding windows (with sinks), dilated windows, per-head spans and
neighborhoods in 1-D and 2-D — each query sees a fixed pattern of nearby keys."""

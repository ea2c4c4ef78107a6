"""Vision attention on 2-D grids of tokens (row-major, ``grid=(H, W)``): windows and
shifted windows (Swin), haloed blocks (HaloNet), cross-shaped stripes (CSWin), block
and grid attention (MaxViT), criss-cross (CCNet) and axial attention, HiLo (LITv2),
and the pooled, aggregated, channel, polarized, cascaded, gated and reversed forms.
Most are noncausal self-attention only (each spec lists its patterns); the shared
grid machinery (partitions, shifts, region masks, pooling) is
:mod:`attnzoo.kernels.grid2d`."""

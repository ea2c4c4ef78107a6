"""Vision layers: CSWin's cross-shaped window attention with LePE.

:class:`CrossShapedAttention` is the attention sublayer of a CSWin block ("CSWin
Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows", Dong et
al., CVPR 2022): a q/k/v projection, the method ``cross_shaped`` (the first ``⌈heads/2⌉``
heads in horizontal stripes of ``stripe_width`` rows, the others in vertical stripes),
the Locally-enhanced Positional Encoding and the output projection::

    attn = CrossShapedAttention(dim=64, heads=4, grid=(16, 16), stripe_width=2)
    y = attn(x)                       # x: (B, H·W, dim), tokens row-major

LePE (``lepe=True``): "a depth-wise convolution on V", added to the attention output,
``Attention(Q, K, V) = SoftMax(QKᵀ/√d) V + DWConv(V)``. As in CSWin's code (``get_lepe``),
the 3 × 3 depthwise convolution runs inside each stripe of the head's branch (zero
padding at the stripe borders and at the image borders), one kernel per channel of V,
with a bias, per branch. The attention maths is the method's; here are the projections
and the positional term.

Judgement calls: [J] a grid the stripe width does not divide gets a narrower last
stripe (the method's padding rule), which the convolution sees zero-padded; [J] one
projection for all heads (CSWin projects the whole ``dim`` then splits the channels
between the branches — the same thing); no GQA.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import registry
from ..errors import AttentionInputError, fmt_shape
from ..kernels.common import int_pair


def stripe_conv(v: torch.Tensor, grid: tuple, stripe: tuple, weight: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    """A depthwise convolution of ``v (B, h, N, d)`` (tokens row-major on ``grid``) inside
    each ``stripe = (rows, cols)`` window of the grid padded to multiples of the stripe
    (zero padding at every window border); ``weight (h·d, 1, kh, kw)``, ``bias (h·d,)``."""
    B, h, N, d = v.shape
    H, W = grid
    sh, sw = stripe
    Hp, Wp = -(-H // sh) * sh, -(-W // sw) * sw
    x = v.permute(0, 1, 3, 2).reshape(B, h * d, H, W)
    x = F.pad(x, (0, Wp - W, 0, Hp - H))
    nh, nw = Hp // sh, Wp // sw
    x = x.view(B, h * d, nh, sh, nw, sw).permute(0, 2, 4, 1, 3, 5).reshape(B * nh * nw, h * d, sh, sw)
    kh, kw = weight.shape[-2:]
    x = F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=h * d)
    x = x.view(B, nh, nw, h * d, sh, sw).permute(0, 3, 1, 4, 2, 5).reshape(B, h * d, Hp, Wp)[:, :, :H, :W]
    return x.reshape(B, h, d, N).permute(0, 1, 3, 2)


class CrossShapedAttention(nn.Module):
    """CSWin's cross-shaped window self-attention layer with LePE.

    Args:
        dim: model width of ``x: (B, N, dim)``; ``heads``: attention heads (``dim % heads == 0``).
        grid: ``(H, W)`` with ``H·W = N`` (tokens row-major).
        stripe_width: rows per horizontal stripe and columns per vertical stripe.
        lepe: add the Locally-enhanced Positional Encoding (3 × 3 depthwise conv of V per stripe).
        qkv_bias: biases in the q/k/v projection (CSWin: True). ``impl``: the method's implementation.
    """

    def __init__(self, dim: int, heads: int, grid, stripe_width: int = 7, *, lepe: bool = True,
                 qkv_bias: bool = True, impl: str = "auto"):
        super().__init__()
        if dim % heads:
            raise AttentionInputError(f"dim={dim} must be divisible by heads={heads}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.grid = int_pair("CrossShapedAttention: grid", grid)
        self.stripe_width, self.impl = int(stripe_width), impl
        self.spec = registry.get("cross_shaped")
        self.spec.resolve_options({"grid": self.grid, "stripe_width": self.stripe_width})  # checked now
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.hh = (heads + 1) // 2  # horizontal heads, as the method splits them
        self.lepe_h = self.lepe_v = None
        if lepe:
            ch, cv = self.hh * self.head_dim, (heads - self.hh) * self.head_dim
            self.lepe_h = nn.Conv2d(ch, ch, 3, padding=1, groups=ch)
            self.lepe_v = nn.Conv2d(cv, cv, 3, padding=1, groups=cv) if cv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H·W, dim) -> (B, H·W, dim)."""
        H, W = self.grid
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] != H * W or x.shape[2] != self.dim:
            got = fmt_shape(x) if isinstance(x, torch.Tensor) else type(x).__name__
            raise AttentionInputError(f"x must have shape (B, H·W, dim) = (B, {H * W}, {self.dim}), got {got}")
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = self.spec(q, k, v, grid=self.grid, stripe_width=self.stripe_width, impl=self.impl)
        if self.lepe_h is not None:
            sw, hh = self.stripe_width, self.hh
            pos = [stripe_conv(v[:, :hh], self.grid, (min(sw, H), W), self.lepe_h.weight, self.lepe_h.bias)]
            if self.lepe_v is not None:
                pos.append(stripe_conv(v[:, hh:], self.grid, (H, min(sw, W)), self.lepe_v.weight, self.lepe_v.bias))
            out = out + torch.cat(pos, dim=1)
        return self.proj(out.transpose(1, 2).reshape(B, N, self.dim))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, grid={self.grid}, stripe_width={self.stripe_width}, "
                f"lepe={self.lepe_h is not None}")

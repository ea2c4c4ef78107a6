"""``torch.nn.functional.scaled_dot_product_attention`` with attnzoo's masks and biases.

Causal (lower-right when ``Nq != Nk``), a dense mask or a mask_mod, a key mask and an
additive score_mod are combined into one ``attn_mask``. With none of them (or plain
causal self-attention) SDPA's own fused path runs untouched. An additive bias is kept
in float32: for half inputs SDPA then runs in float32, since SDPA takes a float mask
only in the inputs' dtype and rounding the bias to bfloat16 moves logits by up to 0.5
at distances of a few hundred (ALiBi).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import score_mods
from .masking import make_masker

#: Tolerance factor of the three-way test rule for paths through PyTorch's fused CPU SDPA
#: kernel (vectorised exp, blocked accumulation): it is measured at up to 5x the error of
#: the explicit float32 reference once logits are sharp (e.g. queries scaled by a
#: temperature of 3-4). It is the library's ground truth, so its factor is wider than 3.
SDPA_FUDGE = 8.0


def sdpa_attention(q, k, v, *, scale: float, causal: bool = False, mask=None, key_mask=None,
                   score_mod: Optional[Callable] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).

    ``score_mod`` must be additive (:func:`attnzoo.kernels.score_mods.additive`). Rows
    with nothing visible give zeros (SDPA's masked path would give NaN there).
    """
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    gqa = k.shape[1] != Hq
    if score_mod is None and mask is None and key_mask is None and (not causal or Nq == Nk):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale,
                                              enable_gqa=gqa)
    allowed = make_masker(q, k, causal, mask, key_mask).full()
    attn_mask = allowed
    dtype = q.dtype
    if score_mod is not None:
        bias = score_mods.dense_bias(score_mod, B, Hq, Nq, Nk, q.device, torch.float64 if dtype == torch.float64
                                     else torch.float32)
        if allowed is not None:
            bias = bias.masked_fill(~allowed, float("-inf"))
        attn_mask = bias
        if dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale,
                                         enable_gqa=gqa)
    if attn_mask is not None:
        empty = ~allowed.any(dim=-1, keepdim=True) if allowed is not None else None
        if score_mod is not None:  # a bias of -inf everywhere in a row masks it too
            none_finite = torch.isneginf(attn_mask).all(dim=-1, keepdim=True)
            empty = none_finite if empty is None else empty | none_finite
        if empty is not None and bool(empty.any()):
            out = out.masked_fill(empty, 0.0)
    return out.to(dtype)

"""FlexAttention ("FlexAttention: A Programming Model for Generating Optimized Attention
Kernels") with attnzoo's masks and score_mods, compiled once per process.

``create_block_mask`` evaluates the mask on every (query, key) pair: O(Nq · Nk) work
on each call. Block masks are therefore cached by the mask's ``cache_key`` and the
shape: mask_mods built by attnzoo's mask factories carry a ``cache_key`` (their
parameters), and so does the causal structure. A mask that depends on tensor contents
(a dense mask, a key mask, a mask_mod without ``cache_key``) is rebuilt per call.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional

import torch

from .masking import and_masks, flex_available, tensor_mask

_COMPILED: dict = {}
_BLOCK_MASKS: "OrderedDict[tuple, object]" = OrderedDict()
#: Block masks kept (least recently used dropped first).
BLOCK_MASK_CACHE_SIZE = 64


def flex_unsupported(call) -> Optional[str]:
    """Why FlexAttention cannot serve ``call`` (an object with ``device``, ``dtype``,
    ``requires_grad``, ``dropout_p``, ``head_dim``, ``v_dim``), or None."""
    if not flex_available():
        return "FlexAttention is not available in this PyTorch build"
    if call.device.type not in ("cpu", "cuda", "xpu", "hpu", "mps"):
        return f"FlexAttention runs on CPU and accelerators, not on {call.device.type} tensors"
    if call.device.type == "cpu" and call.requires_grad:
        return "FlexAttention on CPU runs for inference only (inputs require grad)"
    if call.dropout_p > 0:
        return "the flex path has no dropout"
    if call.device.type == "cpu" and call.dtype == torch.float64:
        return "FlexAttention on CPU supports float32/float16/bfloat16 only, not float64"
    if call.head_dim != call.v_dim:
        return "the flex path needs Dv == D"
    return None


def _compiled():
    if "fn" not in _COMPILED:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["fn"]


def cached_block_mask(mask_mod: Callable, key, batch: Optional[int], heads: Optional[int], q_len: int, kv_len: int,
                      device):
    """``create_block_mask(mask_mod, ...)``, cached under ``key`` (None: not cached)."""
    from torch.nn.attention.flex_attention import create_block_mask

    if key is None:
        return create_block_mask(mask_mod, batch, heads, q_len, kv_len, device=device)
    full_key = (key, batch, heads, q_len, kv_len, str(device))
    hit = _BLOCK_MASKS.get(full_key)
    if hit is not None:
        _BLOCK_MASKS.move_to_end(full_key)
        return hit
    made = create_block_mask(mask_mod, batch, heads, q_len, kv_len, device=device)
    _BLOCK_MASKS[full_key] = made
    while len(_BLOCK_MASKS) > BLOCK_MASK_CACHE_SIZE:
        _BLOCK_MASKS.popitem(last=False)
    return made


def flex_attention(q, k, v, *, scale: float, causal: bool = False, mask=None, key_mask=None,
                   score_mod: Optional[Callable] = None, pattern: Optional[Callable] = None) -> torch.Tensor:
    """q: (B, Hq, Nq, D), k/v: (B, Hkv, Nk, D) -> (B, Hq, Nq, D).

    ``pattern``: a method's own mask_mod, combined with causal, ``mask`` and ``key_mask``.
    Rows with nothing visible give zeros.
    """
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    offset = Nk - Nq
    parts, keys = [], []
    if causal:
        def causal_part(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset

        parts.append(causal_part)
        keys.append(("causal", offset))
    for mod in (pattern, mask):
        if mod is None:
            continue
        if isinstance(mod, torch.Tensor):
            parts.append(tensor_mask(mod))
            keys.append(None)
        else:
            parts.append(mod)
            keys.append(getattr(mod, "cache_key", None))
    if key_mask is not None:
        km = key_mask

        def key_part(b, h, q_idx, kv_idx):
            return km[b, kv_idx]

        parts.append(key_part)
        keys.append(None)
    block_mask = None
    if parts:
        mod = parts[0] if len(parts) == 1 else and_masks(*parts)
        key = None if any(x is None for x in keys) else tuple(keys)
        block_mask = cached_block_mask(mod, key, B, Hq, Nq, Nk, q.device)
    out = _compiled()(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != Hq)
    if block_mask is not None:  # rows with nothing visible: keep the contract explicit
        out = torch.nan_to_num(out, nan=0.0)
    return out

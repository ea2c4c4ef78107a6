"""Small helpers every kernel and method uses: the accumulation dtype, GQA head
repetition, and the number of keys each query can see."""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import AttentionInputError


#: Largest score block (elements) a blocked path materialises at once: 4 Mi
#: float32 = 16 MiB, below glibc's 32 MiB mmap threshold, so the block buffers are
#: recycled from the heap instead of being freshly mapped (and first-touched) each time.
BLOCK_ELEMENTS = 1 << 22


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half inputs, else the input dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def needs_graph(*tensors: torch.Tensor) -> bool:
    """Whether autograd records operations on ``tensors``: grad mode is on and one of them
    requires grad. Fast paths take their in-place, no-graph branch when it is False."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def repeat_kv(x: torch.Tensor, q_heads: int) -> torch.Tensor:
    """``(B, Hkv, N, D) -> (B, Hq, N, D)``: each k/v head serves ``Hq // Hkv`` query heads."""
    groups = q_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def visible_counts(causal: bool, q_len: int, kv_len: int, device, qs: int = 0, qe: Optional[int] = None,
                   dtype=torch.float32) -> torch.Tensor:
    """Number of keys each query ``[qs, qe)`` sees under the causal structure alone,
    shape ``(qe-qs, 1)`` (``Nk`` for noncausal, ``i + Nk - Nq + 1`` causal)."""
    qe = q_len if qe is None else qe
    if not causal:
        return torch.full((qe - qs, 1), float(kv_len), device=device, dtype=dtype)
    pos = torch.arange(qs, qe, device=device, dtype=dtype) + (kv_len - q_len)
    return (pos + 1).clamp(min=1).view(-1, 1)


def real_visible_counts(causal: bool, q_len: int, kv_len: int, key_mask: Optional[torch.Tensor], device):
    """Real (unpadded) keys each query may see under causality: ``(B or 1, 1, Nq)`` float32.
    ``key_mask``: ``(B, Nk)`` bool, True = real key, or None."""
    pos = torch.arange(q_len, device=device) + (kv_len - q_len)
    if key_mask is None:
        vis = (pos + 1).clamp(min=0, max=kv_len) if causal else torch.full_like(pos, kv_len)
        return vis.to(torch.float32).view(1, 1, q_len)
    prefix = torch.cat([key_mask.new_zeros(key_mask.shape[0], 1, dtype=torch.long),
                        key_mask.long().cumsum(-1)], dim=-1)  # (B, Nk + 1)
    end = (pos + 1).clamp(min=0, max=kv_len) if causal else torch.full_like(pos, kv_len)
    return prefix[:, end].to(torch.float32).unsqueeze(1)


def mean_density(used: torch.Tensor, visible: torch.Tensor) -> float:
    """Mean over the rows that can see anything of ``used / visible`` (keys actually
    attended over real keys visible): the ``density`` sparse methods report."""
    used, visible = torch.broadcast_tensors(used.to(torch.float32), visible.to(torch.float32))
    rows = visible > 0
    if not bool(rows.any()):
        return 0.0
    return float((used[rows] / visible[rows]).mean())


def int_pair(name: str, value) -> tuple:
    """``value`` as a pair of positive ints ``(H, W)`` (a 2-D grid, a region grid, an
    agent grid); an error naming ``name`` otherwise."""
    try:
        a, b = (int(x) for x in value)
    except (TypeError, ValueError):
        raise AttentionInputError(f"{name} must be a pair of ints (H, W), got {value!r}") from None
    if a < 1 or b < 1:
        raise AttentionInputError(f"{name} must be positive, got {value!r}")
    return a, b

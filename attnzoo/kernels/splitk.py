"""Split-K attention: a few queries over a long KV sequence, split along the keys.

The keys are cut into chunks; each chunk gives a partial softmax result and its
log-sum-exp, and the partials are merged exactly (flash-decoding; "Lean Attention:
Hardware-Aware Scalable Attention Mechanism for the Decode-Phase of Transformers"). All
chunks are processed at once, so on a GPU they run in parallel.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .common import compute_dtype


def merge_partials(outs: torch.Tensor, lses: torch.Tensor, dim: int) -> torch.Tensor:
    """Merge partial softmax-attention results exactly.

    ``outs[..., s, :]`` is chunk ``s``'s normalised output and ``lses[..., s]`` its
    log-sum-exp of scores (``-inf`` for a chunk with nothing visible). The full result
    is ``sum_s exp(lse_s - lse) * out_s`` with ``lse = logsumexp_s lse_s``; rows with
    nothing visible anywhere give zeros.
    """
    lse = torch.logsumexp(lses, dim=dim, keepdim=True)
    weights = torch.exp(lses - lse.masked_fill(torch.isinf(lse), 0.0))
    weights = weights.masked_fill(torch.isinf(lses), 0.0)
    return (weights.unsqueeze(-1) * outs).sum(dim=dim)


def split_k_attention(q, k, v, *, scale: float, causal: bool = False, num_splits: Optional[int] = None,
                      split_size: Optional[int] = None, score_mod: Optional[Callable] = None) -> torch.Tensor:
    """Softmax attention of ``q (B, Hq, T, D)`` over ``k (B, Hkv, L, D)``, ``v (B, Hkv, L, Dv)``.

    The keys are cut into ``num_splits`` chunks (default one per 256 keys) or chunks of
    ``split_size``. ``causal``: lower-right (query ``t`` sees keys ``<= t + L - T``).
    ``score_mod`` is evaluated per chunk with global key indices.
    """
    B, Hq, T, D = q.shape
    Hkv, L, Dv = k.shape[1], k.shape[2], v.shape[3]
    if split_size is None:
        splits = max(1, min(L, num_splits or max(1, L // 256)))
        split_size = -(-L // splits)
    splits = -(-L // split_size)
    pad = splits * split_size - L
    ct = compute_dtype(q.dtype)
    G = Hq // Hkv
    qg = q.to(ct).view(B, Hkv, G, T, D)
    kc = F.pad(k.to(ct), (0, 0, 0, pad)).view(B, Hkv, 1, splits, split_size, D)
    vc = F.pad(v.to(ct), (0, 0, 0, pad)).view(B, Hkv, 1, splits, split_size, Dv)
    # scores per chunk: (B, Hkv, G, splits, T, split_size)
    s = torch.einsum("bhgtd,bhgscd->bhgstc", qg * scale, kc)
    key_idx = torch.arange(splits * split_size, device=q.device).view(1, 1, 1, splits, 1, split_size)
    q_idx = torch.arange(T, device=q.device).view(1, 1, 1, 1, T, 1)
    if score_mod is not None:
        b = torch.arange(B, device=q.device).view(-1, 1, 1, 1, 1, 1)
        h = torch.arange(Hq, device=q.device).view(1, Hkv, G, 1, 1, 1)
        s = score_mod(s, b, h, q_idx, key_idx)
    allowed = key_idx < L
    if causal:
        allowed = allowed & (key_idx <= q_idx + (L - T))
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    p = torch.exp(s - m.masked_fill(torch.isinf(m), 0.0))
    denom = p.sum(dim=-1, keepdim=True)
    out_s = torch.einsum("bhgstc,bhgscd->bhgstd", p, vc.expand(B, Hkv, 1, splits, split_size, Dv))
    out_s = out_s / denom.clamp(min=torch.finfo(ct).tiny)
    lse_s = (m + torch.log(denom)).squeeze(-1)  # -inf where nothing visible
    out = merge_partials(out_s.transpose(3, 4), lse_s.transpose(3, 4), dim=4)  # (B, Hkv, G, T, Dv)
    return out.reshape(B, Hq, T, Dv).to(q.dtype)

"""Channel attention (DaViT): tokens and channels swap roles.

    per head, with the tokens as the feature axis of every channel:
    A = softmax_over_k_channels(scale · Vᵀ K)      (Dv × D: one row per value channel)
    O = Q Aᵀ                                       (Nq × Dv: each query's channels remixed)
    i.e.  O[n, j] = Σ_i softmax_i(scale · Σ_t v[t, j] k[t, i]) · q[n, i]

"DaViT: Dual Attention Vision Transformers" (Ding et al., ECCV 2022). DaViT
alternates spatial window attention with *channel group attention*: inside each
group of C_g channels (here: each head, C_g = D), the channels are the tokens and the
spatial positions their features — ``A(Q, K, V) = softmax(Qᵀ K / √C_g) Vᵀ``, a
``C_g × C_g`` map computed from a global sum over every position, so each channel
token sees the whole image at O(N·C_g²) cost.

How it maps onto q, k, v of shape (B, H, N, D): transpose each head, so a channel is
a "token" whose feature vector is its column over the N positions, and run softmax
attention on the transposed tensors with the roles **query := v's channels, key :=
k's channels, value := q's channels**: ``O = (softmax(scale · vᵀ k) qᵀ)ᵀ``. This is
the paper's formula with its (Q, K, V) read as our (v, k, q) — and DaViT's released
code also applies the channel map to q (``attn = softmax(kᵀv); x = (attn @ qᵀ)ᵀ``;
with D = Dv ours is that with k and v exchanged). In a layer the three projections
are learned, so the naming is free; this one makes the output ``(B, Hq, Nq, Dv)`` for
any D and Dv, and puts the context (k, v) in the channel map and the queries in
what it is applied to, so cross-attention works: the context decides how each query
token's channels are mixed.

Judgement calls:

* [J] The role assignment above (the only one with the library's output shape for
  D != Dv); ``scale`` defaults to ``D ** -0.5``, DaViT's ``head_dim ** -0.5``.
* [J] Key padding: padded tokens leave the sum over positions (their k rows are
  zeroed); a batch row with no real key gives zeros. General (Nq × Nk) masks have no
  meaning here (there are no token-to-token weights): masks=False; and no weights
  to return (the map is channels × channels).
* [J] GQA: the channel map of a k/v head serves its query heads.
* [J] No causal form: the channel map sums over every position (a causal version, a
  prefix sum of ``v_t k_tᵀ`` per position, is not in the paper).
* The grid does not enter: the sums are over all positions (grid-free, 1-D or 2-D alike).

Complexity: time O(N·D·Dv), memory O(D·Dv + N·Dv): linear in N.

Implementations:

* ``reference`` — the transposed tensors through dense softmax attention (queries
  = vᵀ, keys = kᵀ, values = qᵀ), k/v repeated to the query heads;
* ``matmul`` — the channel map of each k/v head by one matmul ``vᵀ k``, its softmax,
  and ``q @ Aᵀ`` in the grouped layout (no k/v copy for GQA).
"""

from __future__ import annotations

import torch

from ...kernels.common import compute_dtype, repeat_kv
from ...kernels.dense import softmax_attention
from ...registry import method

NAME = "channel"


def _masked_keys(k, key_mask, ct):
    """k in the compute dtype with the padded tokens zeroed (they leave the sums)."""
    kc = k.to(ct)
    if key_mask is not None:
        kc = kc * key_mask.to(ct).view(k.shape[0], 1, k.shape[2], 1)
    return kc


def _no_keys(out, key_mask):
    """Zeros for the batch rows with no real key."""
    if key_mask is not None:
        empty = ~key_mask.any(-1)
        if bool(empty.any()):
            out = out.masked_fill(empty.view(-1, 1, 1, 1), 0.0)
    return out


@method(NAME, short_impl="matmul", paper="DaViT: Dual Attention Vision Transformers",
        summary="channels as tokens: a Dv × D softmax channel map from the keys/values, applied to each query",
        patterns=("noncausal_self", "noncausal_cross"), time="O(N D Dv)", memory="O(N Dv + D Dv)", masks=False,
        weights=False)
def channel(q, k, v, call):
    """Channel attention as softmax attention on the transposed tensors (the definition).

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    ct = compute_dtype(q.dtype)
    Hq = q.shape[1]
    k_channels = repeat_kv(_masked_keys(k, call.key_mask, ct), Hq).transpose(-1, -2)  # (B, Hq, D, Nk): D tokens
    v_channels = repeat_kv(v.to(ct), Hq).transpose(-1, -2)  # (B, Hq, Dv, Nk): Dv query tokens
    q_channels = q.to(ct).transpose(-1, -2)  # (B, Hq, D, Nq): D value tokens
    out = softmax_attention(v_channels, k_channels, q_channels, scale=call.scale)  # (B, Hq, Dv, Nq)
    return _no_keys(out.transpose(-1, -2), call.key_mask).to(q.dtype)


@channel.impl("matmul", description="one Dv×D channel map per k/v head (vᵀk, softmax), then q @ mapᵀ in the grouped "
                                    "layout: O(N·D·Dv), no N×N and no k/v copy")
def matmul(q, k, v, call):
    """The channel map by one matmul per k/v head, applied to the grouped queries."""
    ct = compute_dtype(q.dtype)
    B, Hq, Nq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    kc = _masked_keys(k, call.key_mask, ct)
    A = torch.softmax((v.to(ct).transpose(-1, -2) @ kc) * call.scale, dim=-1)  # (B, Hkv, Dv, D)
    out = q.to(ct).reshape(B, Hkv, Hq // Hkv * Nq, D) @ A.transpose(-1, -2)  # (B, Hkv, G·Nq, Dv)
    return _no_keys(out.reshape(B, Hq, Nq, Dv), call.key_mask).to(q.dtype)

"""Sigmoid attention.

    O_i = sum_j  sigmoid(scale * q_i·k_j + b_i) v_j        (masked pairs contribute 0)

"Theory, Analysis, and Best Practices for Sigmoid Self-Attention" (Ramapuram
et al., 2024). There is no row normalisation: each weight is an independent
sigmoid, so any mask simply zeroes terms and a query with nothing visible gets 0.
The paper's key practice is the bias ``b = -log(n)``, which keeps the total
attention mass of a row near 1 at initialisation (``n · sigmoid(-log n) ≈ 1``);
its other practices (LayerScale, QK-norm, ALiBi/RoPE) live in the layer
(``Attention(qk_norm=True, rotary=True)``); the spec's ``layer_options`` name QK-norm,
which the benchmark's task models apply. Without it sigmoid attention does not learn
the quick MQAR task (accuracy 0.345 and 0.342 over two seeds, softmax 1.00), with it it
does (1.00 and 0.92); the bias does not matter there (a fixed ``-log 32`` gives 0.35 and
0.34 without QK-norm): the gap was the task model's, not the method's (see the
claims of ``attnzoo bench claims``). The bias is a score_mod
(:func:`sigmoid_bias`), evaluated densely by the reference and per chunk by
``chunked``.

[J] ``n`` is the number of keys the query can see under the causal structure:
``Nk`` for noncausal rows and ``i + Nk - Nq + 1`` for causal ones. For full
sequences this is the paper's ``-log(n)``; for causal rows it keeps every row's
mass near 1 and makes token-by-token decoding equal the causal forward pass
without knowing the final length. Pass ``bias=<float>`` for a fixed bias.

Time O(N² D); memory O(N²) for the reference, O(N · block) for ``chunked``.
Decoding keeps a KV cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ...errors import AttentionInputError
from ...kernels import score_mods
from ...kernels.caches import KVCacheDecoder
from ...kernels.common import compute_dtype, repeat_kv
from ...kernels.dense import scores
from ...kernels.rows import SigmoidRows, row_attention
from ...kernels.masking import group_mask
from ...kernels.segmented import chunked_rows
from ...registry import MethodOptions, method


@dataclass(frozen=True)
class SigmoidOptions(MethodOptions):
    """Options of ``sigmoid``.

    Attributes:
        bias: a fixed logit bias; None (default) for ``-log(n)``, n = the keys a query sees.
        block_q: query rows per chunk of ``chunked`` (default: a 16 MiB score block).
    """

    bias: Optional[float] = None
    block_q: Optional[int] = None

    def validate(self) -> None:
        if self.block_q is not None and self.block_q < 1:
            raise AttentionInputError(f"option block_q must be a positive int (or None), got {self.block_q!r}")


def sigmoid_bias(bias: Optional[float], causal: bool, q_len: int, kv_len: int):
    """The bias as an additive score_mod: ``score + bias``, or ``score - log(n_i)`` with
    ``n_i`` the keys query ``i`` sees under the causal structure (lower-right)."""
    if bias is not None:
        b = float(bias)

        def fixed_bias(score, b_idx, h, q_idx, kv_idx):
            return score + b

        return score_mods.additive(fixed_bias)
    if not causal:
        log_n = math.log(kv_len)

        def minus_log_keys(score, b_idx, h, q_idx, kv_idx):
            return score - log_n

        return score_mods.additive(minus_log_keys)
    offset = kv_len - q_len

    def minus_log_visible(score, b_idx, h, q_idx, kv_idx):
        n = (q_idx + offset + 1).clamp(min=1).to(score.dtype)
        return score - torch.log(n)

    return score_mods.additive(minus_log_visible)


def _score_mod(call):
    return score_mods.compose(sigmoid_bias(call.options.bias, call.causal, call.q_len, call.kv_len), call.score_mod)


@method("sigmoid", short_impl="chunked", options=SigmoidOptions, paper="Theory, Analysis, and Best Practices for Sigmoid Self-Attention",
        summary="elementwise sigmoid instead of softmax, bias -log(n)", time="O(N^2 D)",
        memory="O(N·block) chunked, O(N^2) reference", score_mods=True, decoder=KVCacheDecoder(),
        layer_options={"qk_norm": True})
def sigmoid(q, k, v, call):
    """Sigmoid attention with explicit N×N weights.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    ct = compute_dtype(q.dtype)
    w = torch.sigmoid(scores(q, k, call.scale, _score_mod(call)))
    allowed = call.masker.full()
    if allowed is not None:
        w = w.masked_fill(~allowed, 0.0)
    out = (w @ repeat_kv(v, call.q_heads).to(ct)).to(q.dtype)
    return (out, w.to(q.dtype)) if call.return_weights else out


def _fast(q, k, v, call):
    """:func:`attnzoo.kernels.rows.row_attention` with the bias ``-log n_i`` per row."""
    G, fixed, causal, offset = call.q_heads // call.kv_heads, call.options.bias, call.causal, call.offset
    ct = compute_dtype(q.dtype)

    def bias_of(qs, qe):
        if fixed is not None:
            return torch.full((1, 1, 1), float(fixed), dtype=ct, device=q.device)
        if not causal:
            return torch.full((1, 1, 1), -math.log(call.kv_len), dtype=ct, device=q.device)
        visible = (torch.arange(qs, qe, device=q.device, dtype=ct) + offset + 1).clamp(min=1)
        return (-torch.log(visible)).repeat(G).view(1, G * (qe - qs), 1)

    return row_attention(q, k, v, SigmoidRows, scale=call.scale, causal=causal, bias_of=bias_of,
                         block_q=call.options.block_q)


@sigmoid.impl("chunked", options=("block_q",),
              description="query-row chunks recomputed in the backward, O(N·block) memory")
def chunked(q, k, v, call):
    """Query rows in chunks, recomputed in the backward: O(N · block) memory, autograd works,
    keys past the causal frontier never touched. GQA without copying K/V.

    With no mask, key mask or score_mod of the caller's, the chunks run in
    :func:`attnzoo.kernels.rows.row_attention` (a hand-written backward): one ``baddbmm``
    (scale and the bias ``-log n_i`` fused into the score GEMM), ``-inf`` on the causal
    triangle only, an in-place sigmoid (masked entries become exactly 0), the value GEMM."""
    B, Hq, Hkv, D = call.batch, call.q_heads, call.kv_heads, call.head_dim
    G = Hq // Hkv
    ct = compute_dtype(q.dtype)
    masker, mod, scale = call.masker, _score_mod(call), call.scale
    if call.mask is None and call.key_mask is None and call.score_mod is None:
        return _fast(q, k, v, call)

    def rows(qb, kb, vb, qs, qe):
        n, m = qe - qs, kb.shape[2]
        s = (qb.to(ct).view(B, Hkv, G, n, D) @ kb.to(ct).unsqueeze(2).transpose(-1, -2)) * scale
        w = torch.sigmoid(score_mods.apply(mod, s, qs, 0, batch=B, heads=Hq, kv_heads=Hkv))
        allowed = masker.block(qs, qe, 0, m)
        if allowed is not None:
            w = w.masked_fill(~group_mask(allowed, Hkv, G), 0.0)
        return (w @ vb.to(ct).unsqueeze(2)).reshape(B, Hq, n, -1).to(q.dtype)

    return chunked_rows(rows, q, k, v, masker, call.options.block_q)

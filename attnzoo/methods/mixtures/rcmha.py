"""Relative convolutional multi-head attention (RCMHA).

    q̃ = DConv_q(q),   k̃ = DConv_k(k),   ṽ = DConv_v(v)        depth-wise convolutions along the sequence
    s_ij = scale · [ (q̃_i + u_h)·k̃_j  +  (q̃_i + w_h)·r_{clip(p_i − j)} ]     p_i = i + Nk − Nq
    O = softmax(s) ṽ

"RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling"
(Sugiharto et al., 2023). RCMHA joins two earlier changes to multi-head attention:
the depth-wise convolutions of Primer's Multi-DConv-Head Attention, applied to the
query, key and value embeddings of every head (each channel its own small kernel
along the sequence, so every q, k, v mixes its neighbours), and the relative
positions of Transformer-XL's relative multi-head attention (RMHA), added to the
scaled dot-product scores. The relative part is Transformer-XL's decomposition:
content–content ``q̃·k̃``, content–position ``q̃·r``, a global content bias ``u`` and
a global position bias ``w`` (Transformer-XL's ``u``, ``v``), with ``r_d`` the
embedding of the distance ``d`` between the query's position and the key's.

Options (the functional form takes every parameter): ``q_conv``, ``k_conv``,
``v_conv`` — depth-wise kernels ``(Hq·D, 1, k)``, ``(Hkv·D, 1, k)``, ``(Hkv·Dv, 1, k)``
(channel ``h·D + d``), or ``(1, 1, k)`` shared, ``k`` odd (None: no convolution);
``rel_embed`` — ``(2K+1, D)`` or ``(Hq, 2K+1, D)`` embeddings of the distances
``−K .. K`` (row ``d + K``), or ``"sinusoidal"``: Transformer-XL's sinusoid table of
width D for ``K = max_distance`` (None: no position term); ``content_bias`` u and
``position_bias`` w — ``(D,)`` or ``(Hq, D)``. :class:`RelativeConvAttention`
(``attnzoo.build("rcmha", heads=..., head_dim=...)``) learns them: the kernels
(initialised to the identity), Transformer-XL's per-head projection ``W_R`` of the
sinusoid table (``r = R W_R``) and u, w (zeros).

Judgement calls:

* [J] The kernels are centred (odd ``k``, tap ``c = (k−1)/2`` is the token itself):
  ``y_t = Σ_u w_u x_{t+u−c}``. The causal patterns use only the past and current taps
  (``u <= c``), so a kernel trained bidirectionally is also a causal one, and the
  identity kernel is the identity in both. Zero padding at the ends.
* [J] Padded keys (``key_padding_mask``) are zeroed before the key and value
  convolutions, so padding never leaks into real keys.
* [J] Distances are clipped to ``[−K, K]`` (Shaw et al.'s clipping; Transformer-XL's
  table covers the whole memory): positions are aligned lower-right, so decoding and
  cross-attention see the same distances as the causal forward pass.
* [J] In cross-attention the query convolution runs along the queries and the key and
  value ones along the memory, each in its own sequence.
* The query convolution mixes neighbouring queries, so a row is not independent of the
  other queries (``rows_independent=False``): cross-attention is not decoded one query
  at a time. Causal self-attention decodes with a KV cache of the convolved keys and
  values plus the last ``c`` raw q, k, v (the convolutions' history).

Time O(N² D + N K D); memory O(N²) for the reference and ``sdpa`` (the relative term
is a dense float bias), O(N · block + N K) for ``chunked``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from ...errors import AttentionInputError, fmt_shape
from ...kernels.caches import Decoder, KVCache
from ...kernels.common import compute_dtype, repeat_kv
from ...kernels.dense import masked_softmax
from ...kernels.heads import check_depthwise, chunked_rows_with_data, depthwise_conv_seq
from ...kernels.masking import group_mask
from ...kernels.segmented import chunked_rows
from ...registry import MethodOptions, method

#: softmax's SDPA tolerance factor (PyTorch's fused CPU kernel at sharp logits).
SDPA_FUDGE = 8.0


@dataclass(frozen=True)
class RCMHAOptions(MethodOptions):
    """Options of ``rcmha``.

    Attributes:
        q_conv, k_conv, v_conv: depth-wise kernels ``(Hq·D, 1, k)``, ``(Hkv·D, 1, k)``,
            ``(Hkv·Dv, 1, k)`` or ``(1, 1, k)``, ``k`` odd; None: no convolution.
        rel_embed: ``(2K+1, D)`` or ``(Hq, 2K+1, D)`` distance embeddings (row ``d + K`` for
            the distance d = query position − key position), ``"sinusoidal"`` (the fixed
            Transformer-XL table, K = ``max_distance``) or None (no position term).
        max_distance: K of the ``"sinusoidal"`` table.
        content_bias: u, ``(D,)`` or ``(Hq, D)``; ``position_bias``: w, likewise.
        block_q: query rows per chunk of ``chunked``.
    """

    q_conv: Optional[torch.Tensor] = None
    k_conv: Optional[torch.Tensor] = None
    v_conv: Optional[torch.Tensor] = None
    rel_embed: Union[None, str, torch.Tensor] = None
    max_distance: int = 64
    content_bias: Optional[torch.Tensor] = None
    position_bias: Optional[torch.Tensor] = None
    block_q: Optional[int] = None

    def validate(self) -> None:
        if isinstance(self.rel_embed, str) and self.rel_embed != "sinusoidal":
            raise AttentionInputError(f"rel_embed must be a tensor, 'sinusoidal' or None, got {self.rel_embed!r}")
        if self.max_distance < 0:
            raise AttentionInputError(f"max_distance must be >= 0, got {self.max_distance!r}")
        if self.block_q is not None and self.block_q < 1:
            raise AttentionInputError(f"option block_q must be a positive int (or None), got {self.block_q!r}")

    @classmethod
    def for_length(cls, n: int) -> dict:
        """Distances clipped at a quarter of the sequence, at most the default 64 (so the
        relative table and ``chunked``'s O(N K) per-distance scores stay constant in N), and
        [J] a light fixed smoothing kernel on q, k and v (three taps, a different one each),
        so that every path the tests and the benchmark run exercises the convolutions and
        the relative term (the module learns its own kernels; it takes only
        ``max_distance`` from here)."""
        return {"rel_embed": "sinusoidal", "max_distance": max(1, min(64, n // 4)),
                "q_conv": torch.tensor([[[0.25, 0.5, 0.25]]]), "k_conv": torch.tensor([[[0.1, 0.6, 0.3]]]),
                "v_conv": torch.tensor([[[0.3, 0.5, 0.2]]])}


# ------------------------------------------------------------------------ the parts


def sinusoid_table(max_distance: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Transformer-XL's relative position table ``(2K+1, dim)``: row ``d + K`` is
    ``[sin(d f_0), ..., sin(d f_{m-1}), cos(d f_0), ...]`` with ``f_i = 10000^(−2i/dim)``
    (``m = ceil(dim/2)``; an odd width drops the last cosine)."""
    K = int(max_distance)
    half = (dim + 1) // 2
    freq = 10000.0 ** (-torch.arange(half, dtype=torch.float64) * 2 / dim)
    d = torch.arange(-K, K + 1, dtype=torch.float64)[:, None] * freq[None, :]
    return torch.cat([d.sin(), d.cos()], dim=-1)[:, :dim].to(device=device, dtype=dtype)


def check_kernels(o, Hq: int, Hkv: int, D: int, Dv: int) -> tuple:
    """The options' kernels ``(q_conv, k_conv, v_conv)``, each checked (or None)."""
    for name, w, ch, layout in (("q_conv", o.q_conv, Hq * D, "(Hq·D, 1, k)"),
                                ("k_conv", o.k_conv, Hkv * D, "(Hkv·D, 1, k)"),
                                ("v_conv", o.v_conv, Hkv * Dv, "(Hkv·Dv, 1, k)")):
        if w is not None:
            check_depthwise(name, w, ch, layout)
    return o.q_conv, o.k_conv, o.v_conv


def _kernels(call):
    return check_kernels(call.options, call.q_heads, call.kv_heads, call.head_dim, call.v_dim)


def relative_parts(call, ct):
    """``(R (1, Hq|1, 2K+1, D) | None, K, u (1, Hq|1, 1, D) | None, w (...) | None)`` in ``ct``."""
    o = call.options
    Hq, D, dev = call.q_heads, call.head_dim, call.device
    R = o.rel_embed
    if isinstance(R, str):
        R = sinusoid_table(o.max_distance, D, dev, ct)
    if R is not None:
        if (not isinstance(R, torch.Tensor) or R.dim() not in (2, 3) or R.shape[-1] != D or R.shape[-2] % 2 == 0
                or (R.dim() == 3 and R.shape[0] not in (1, Hq))):
            raise AttentionInputError(
                f"rel_embed must have shape (2K+1, D) or (Hq, 2K+1, D) with D = {D}, Hq = {Hq} and an odd number of "
                f"distances, got {fmt_shape(R) if isinstance(R, torch.Tensor) else type(R).__name__}")
        R = R.to(device=dev, dtype=ct)
        R = R.reshape(1, R.shape[0] if R.dim() == 3 else 1, R.shape[-2], D)
    K = (R.shape[-2] - 1) // 2 if R is not None else 0
    biases = []
    for name, b in (("content_bias", o.content_bias), ("position_bias", o.position_bias)):
        if b is not None:
            if (not isinstance(b, torch.Tensor) or b.dim() not in (1, 2) or b.shape[-1] != D
                    or (b.dim() == 2 and b.shape[0] not in (1, Hq))):
                raise AttentionInputError(
                    f"{name} must have shape (D,) or (Hq, D) with D = {D}, Hq = {Hq}, got "
                    f"{fmt_shape(b) if isinstance(b, torch.Tensor) else type(b).__name__}")
            b = b.to(device=dev, dtype=ct).reshape(1, -1, 1, D)
        biases.append(b)
    return R, K, biases[0], biases[1]


def distance_index(qs: int, qe: int, kv_len: int, offset: int, K: int, device) -> torch.Tensor:
    """``clip(p_i − j, −K, K) + K`` for queries ``[qs, qe)`` and every key: ``(qe−qs, Nk)``."""
    pos = torch.arange(qs, qe, device=device) + offset
    return (pos[:, None] - torch.arange(kv_len, device=device)[None, :]).clamp(-K, K) + K


def _zero_padding(k, v, key_mask):
    if key_mask is None:
        return k, v
    keep = key_mask.view(key_mask.shape[0], 1, -1, 1)
    return k * keep.to(k.dtype), v * keep.to(v.dtype)


def _conv_explicit(x, weight, causal):
    """The depth-wise convolution as explicit shifted sums (the reference's form):
    ``y_t = Σ_u w_u x_{t+u−c}`` over ``u <= c`` (causal) or all ``u``; zero padding."""
    if weight is None:
        return x
    B, H, N, D = x.shape
    k = weight.shape[-1]
    c = (k - 1) // 2
    w = weight.to(x.dtype).expand(H * D, 1, k).reshape(H, D, k)
    y = torch.zeros_like(x)
    for u in range(k if not causal else c + 1):
        shift = u - c  # y_t takes x_{t + shift}
        src = x[:, :, max(0, shift):N + min(0, shift)]
        y[:, :, max(0, -shift):N - max(0, shift)] += w[:, :, u].view(1, H, 1, D) * src
    return y


# ------------------------------------------------------------------------ reference


@method("rcmha", short_impl="chunked", options=RCMHAOptions,
        paper="RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling",
        summary="depth-wise convolutions on Q, K, V plus Transformer-XL relative positions in the scores",
        time="O(N^2 D + N K D)", memory="O(N·block + N K) chunked, O(N^2) reference and sdpa",
        rows_independent=False)
def rcmha(q, k, v, call):
    """RCMHA with the convolutions as explicit shifted sums and explicit N×N scores.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    ct = compute_dtype(q.dtype)
    Hq = call.q_heads
    wq, wk, wv = _kernels(call)
    k, v = _zero_padding(k.to(ct), v.to(ct), call.key_mask)
    qc = _conv_explicit(q.to(ct), wq, call.causal)
    kc = repeat_kv(_conv_explicit(k, wk, call.causal), Hq)
    vc = repeat_kv(_conv_explicit(v, wv, call.causal), Hq)
    R, K, u, w = relative_parts(call, ct)
    s = (qc if u is None else qc + u) @ kc.transpose(-1, -2)  # content–content (+ global content bias)
    if R is not None:
        # content–position: the score of each query against each distance embedding, then
        # each pair (i, j) reads its distance's: (q̃_i + w)·r_{clip(p_i - j)}
        per_distance = (qc if w is None else qc + w) @ R.transpose(-1, -2)  # (B, Hq, Nq, 2K+1)
        idx = distance_index(0, call.q_len, call.kv_len, call.offset, K, q.device)
        s = s + per_distance[:, :, torch.arange(call.q_len, device=q.device)[:, None], idx]
    s = s * call.scale
    p = masked_softmax(s, call.masker.full())
    out = (p @ vc).to(q.dtype)
    return (out, p.to(q.dtype)) if call.return_weights else out


# ----------------------------------------------------------------------------- fast


def _prepared(q, k, v, call, ct):
    """Convolved ``q̃ + u``, ``k̃``, ``ṽ`` (compute dtype; conv1d) and the per-distance scores
    ``(q̃ + w) Rᵀ`` (or None) with K."""
    wq, wk, wv = _kernels(call)
    k, v = _zero_padding(k.to(ct), v.to(ct), call.key_mask)
    qc = depthwise_conv_seq(q, wq, call.causal) if wq is not None else q.to(ct)
    kc = depthwise_conv_seq(k, wk, call.causal) if wk is not None else k
    vc = depthwise_conv_seq(v, wv, call.causal) if wv is not None else v
    R, K, u, w = relative_parts(call, ct)
    per_distance = None if R is None else (qc if w is None else qc + w) @ R.transpose(-1, -2)
    return (qc if u is None else qc + u), kc, vc, per_distance, K


@rcmha.impl("sdpa", fudge=SDPA_FUDGE,
            description="conv1d on q, k, v; the relative term as SDPA's float bias (gathered per distance)")
def sdpa(q, k, v, call):
    """Convolutions by ``conv1d``, then SDPA with the content–position term as its float
    ``attn_mask`` (which SDPA differentiates): O(N²) memory for the bias, as any SDPA mask."""
    ct = compute_dtype(q.dtype)
    qc, kc, vc, per_distance, K = _prepared(q, k, v, call, ct)
    allowed = call.masker.full()
    bias = None
    if per_distance is not None:
        idx = distance_index(0, call.q_len, call.kv_len, call.offset, K, q.device)
        bias = per_distance.gather(-1, idx.expand(*per_distance.shape[:2], *idx.shape)) * call.scale
    if allowed is not None:
        fill = torch.zeros(allowed.shape, dtype=ct, device=q.device).masked_fill(~allowed, float("-inf"))
        bias = fill if bias is None else bias + fill
    gqa = call.q_heads != call.kv_heads
    if bias is None:
        out = F.scaled_dot_product_attention(qc, kc, vc, scale=call.scale, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=bias, scale=call.scale, enable_gqa=gqa)
        if allowed is not None:
            empty = ~allowed.any(dim=-1, keepdim=True)  # SDPA gives NaN there; attnzoo gives zeros
            if bool(empty.any()):
                out = out.masked_fill(empty, 0.0)
    return out.to(q.dtype)


@rcmha.impl("chunked", options=("block_q",),
            description="conv1d, then query-row chunks with their per-distance scores, recomputed in the backward, "
                        "O(N·block + N·K) memory")
def chunked(q, k, v, call):
    """Convolutions by ``conv1d``; the per-distance scores ``(q̃ + w) Rᵀ`` (O(N K)) ride
    along with the query rows, which run in chunks recomputed in the backward pass:
    O(N · block + N K) memory, no N×N tensor; GQA without copying K/V."""
    ct = compute_dtype(q.dtype)
    B, Hq, Hkv, D = call.batch, call.q_heads, call.kv_heads, call.head_dim
    G = Hq // Hkv
    qc, kc, vc, per_distance, K = _prepared(q, k, v, call, ct)
    masker, scale, offset = call.masker, call.scale, call.offset

    def scores(qb, kb, qs, qe):
        n, m = qe - qs, kb.shape[2]
        return qb.reshape(B, Hkv, G, n, D) @ kb.unsqueeze(2).transpose(-1, -2), n, m

    def finish(s, vb, qs, qe, n, m):
        allowed = masker.block(qs, qe, 0, m)
        p = masked_softmax(s * scale, None if allowed is None else group_mask(allowed, Hkv, G))
        return (p @ vb.unsqueeze(2)).reshape(B, Hq, n, -1).to(q.dtype)

    if per_distance is None:
        def rows(qb, kb, vb, qs, qe):
            s, n, m = scores(qb, kb, qs, qe)
            return finish(s, vb, qs, qe, n, m)

        return chunked_rows(rows, qc, kc, vc, masker, call.options.block_q)

    def rows_with_positions(qb, db, kb, vb, qs, qe):
        s, n, m = scores(qb, kb, qs, qe)
        idx = distance_index(qs, qe, m, offset, K, q.device)  # the chunk's keys are [0, m) of the Nk
        pos = db.reshape(B, Hkv, G, n, -1).gather(-1, idx.expand(B, Hkv, G, n, m))
        return finish(s + pos, vb, qs, qe, n, m)

    return chunked_rows_with_data(rows_with_positions, qc, per_distance, kc, vc, masker, call.options.block_q)


# -------------------------------------------------------------------------- decoding


class RCMHAState:
    """A KV cache of the convolved keys and values, and the last ``c`` raw q, k, v (the
    causal convolutions' history)."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.tails: dict = {}

    @property
    def length(self) -> int:
        return self.cache.length

    def nbytes(self) -> int:
        return self.cache.nbytes() + sum(t.numel() * t.element_size() for t in self.tails.values())


def _conv_step(state: RCMHAState, name: str, x: torch.Tensor, weight) -> torch.Tensor:
    """The causal convolution of the new tokens ``x (B, H, T, D)`` given the last raw tokens."""
    if weight is None:
        return x
    c = (weight.shape[-1] - 1) // 2
    tail = state.tails.get(name)
    hist = x if tail is None else torch.cat([tail, x], dim=2)
    if c:
        state.tails[name] = hist[:, :, -c:]
    # fewer than c earlier tokens: the sequence starts there, which is the zero padding
    return depthwise_conv_seq(hist, weight, True)[:, :, -x.shape[2]:].to(x.dtype)


@rcmha.decodes
class RCMHADecoder(Decoder):
    """Causal decoding: the new tokens are convolved with the last ``c`` raw ones, their
    convolved keys and values appended to a KV cache, and the new convolved queries
    attend the cache with the relative term (lower-right distances)."""

    state_size = "KV cache of the convolved k, v: 2·Hkv·N·D, plus the last (k−1)/2 raw q, k, v"

    def init_state(self, batch_size, kv_heads, head_dim, v_dim, *, dtype, device, max_len, options):
        return RCMHAState(KVCache(batch_size, kv_heads, head_dim, v_dim, dtype=dtype, device=device,
                                  capacity=max_len))

    def step(self, run, state, q, k, v, *, scale, impl, options):
        check_kernels(options, q.shape[1], k.shape[1], q.shape[3], v.shape[3])
        qc = _conv_step(state, "q", q, options.q_conv)
        kc = _conv_step(state, "k", k, options.k_conv)
        vc = _conv_step(state, "v", v, options.v_conv)
        state.cache.append(kc, vc)
        plain = dataclasses.replace(options, q_conv=None, k_conv=None, v_conv=None)  # already convolved
        return run(qc, state.cache.keys, state.cache.values, causal=q.shape[2] > 1, scale=scale, options=plain)


# --------------------------------------------------------------------------- module


@rcmha.module_class
class RelativeConvAttention(torch.nn.Module):
    """RCMHA's parameters: the depth-wise kernels of q, k and v (identity at
    initialisation), Transformer-XL's per-head projection ``W_R`` of the fixed sinusoid
    table (``r_d = R_d W_R^h``) and the global biases u, w (zeros). Call it like the
    functional form: ``module(q, k, v, causal=..., mask=..., impl=...)``.

    Args:
        heads, kv_heads: query and key/value heads (``kv_heads`` defaults to ``heads``).
        head_dim: D. ``v_dim``: Dv (default D).
        kernel_size: odd size of the depth-wise kernels (causal patterns use the
            ``(k+1)/2`` past and current taps). ``max_distance``: K.
    """

    def __init__(self, heads: int, head_dim: int, kv_heads: Optional[int] = None, v_dim: Optional[int] = None,
                 impl: str = "auto", kernel_size: int = 5, max_distance: int = 64):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise AttentionInputError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        kv_heads = kv_heads or heads
        v_dim = v_dim or head_dim
        self.heads, self.kv_heads, self.impl, self.max_distance = heads, kv_heads, impl, int(max_distance)

        def identity(channels):
            w = torch.zeros(channels, 1, kernel_size)
            w[:, 0, (kernel_size - 1) // 2] = 1.0
            return torch.nn.Parameter(w)

        self.q_conv, self.k_conv, self.v_conv = identity(heads * head_dim), identity(kv_heads * head_dim), \
            identity(kv_heads * v_dim)
        self.rel_proj = torch.nn.Parameter(torch.empty(heads, head_dim, head_dim).uniform_(-1, 1) / math.sqrt(head_dim))
        self.content_bias = torch.nn.Parameter(torch.zeros(heads, head_dim))
        self.position_bias = torch.nn.Parameter(torch.zeros(heads, head_dim))
        self.register_buffer("table", sinusoid_table(self.max_distance, head_dim), persistent=False)

    def options(self) -> dict:
        rel = torch.einsum("kd,hde->hke", self.table.to(self.rel_proj.dtype), self.rel_proj)  # (Hq, 2K+1, D)
        return {"q_conv": self.q_conv, "k_conv": self.k_conv, "v_conv": self.v_conv, "rel_embed": rel,
                "content_bias": self.content_bias, "position_bias": self.position_bias}

    def forward(self, q, k, v, **kwargs):
        kwargs.setdefault("impl", self.impl)
        return rcmha(q, k, v, **self.options(), **kwargs)

    def init_state(self, batch_size, kv_heads, head_dim, v_dim, *, dtype=torch.float32, device=None, max_len=None):
        return rcmha.init_state(batch_size, kv_heads, head_dim, v_dim, dtype=dtype, device=device, max_len=max_len)

    def step(self, state, q, k, v, *, scale=None, impl="auto"):
        return rcmha.step(state, q, k, v, scale=scale, impl=impl, **self.options())

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, kv_heads={self.kv_heads}, kernel_size={self.q_conv.shape[-1]}, "
                f"max_distance={self.max_distance}")

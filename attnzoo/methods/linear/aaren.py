"""Aaren: attention as a many-to-many RNN with a learned query.

    o_t = Σ_{j <= t} softmax_j(s_j) v_j,     s_j = scale · q · k_j      (one query q per head)

"Attention as an RNN" (Feng et al., 2024). With a query that does not depend on the
position, softmax attention over a growing prefix is an RNN whose state is the
online-softmax triple ``(m_t, u_t, w_t) = (max_j s_j, Σ e^(s_j - m_t), Σ e^(s_j - m_t) v_j)``,
and ``o_t = w_t / u_t``. Two triples combine associatively
(``m = max(m_a, m_b)``, ``u = u_a e^(m_a - m) + u_b e^(m_b - m)``, likewise ``w``), so all
N outputs come from a prefix scan; decoding keeps one triple — constant memory.

The query is a learned token (:class:`AarenAttention` holds it, one per head). The
functional form takes it as ``q`` of shape ``(B, Hq, 1, D)`` and returns one output per
key, ``(B, Hq, Nk, Dv)`` (the spec says ``query="learned"``). Only the causal self
pattern exists: each output summarises its own prefix.

Fast form ``scan``: the prefix scan blocked in chunks of C tokens — inside a chunk the
C×C masked ``exp(s_j - m_i)`` products (parallel), across chunks a scan over the N/C
chunk triples. Time O(N·C·Dv), memory O(N·C + Dv) per head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...kernels.caches import Decoder, RecurrentState
from ...kernels.common import compute_dtype, repeat_kv
from ...kernels.linear_scan import DEFAULT_CHUNK, check_chunk
from ...registry import MethodOptions, method


@dataclass(frozen=True)
class AarenOptions(MethodOptions):
    """Options of ``aaren``.

    Attributes:
        chunk: tokens per chunk of the blocked prefix scan (``scan`` and decoding).
    """

    chunk: int = DEFAULT_CHUNK

    def validate(self) -> None:
        check_chunk(self.chunk)


def _scores(q, k, v, key_mask, scale):
    ct = compute_dtype(q.dtype)
    Hq = q.shape[1]
    kk, vv = repeat_kv(k, Hq).to(ct), repeat_kv(v, Hq).to(ct)
    s = (kk @ q.to(ct).transpose(-1, -2)).squeeze(-1) * scale  # (B, Hq, Nk)
    if key_mask is not None:  # True = real key
        s = s.masked_fill(~key_mask.view(k.shape[0], 1, -1), float("-inf"))
    return s, vv


@method("aaren", options=AarenOptions,
        summary="attention as a many-to-many RNN: one learned query, outputs by a prefix scan of online-softmax triples",
        paper="Attention as an RNN", patterns=("causal_self",), time="O(N D)", memory="O(N D)", masks=False,
        query="learned")
def aaren(q, k, v, call):
    """Explicit ``(Nk, Nk)`` weights: row t is the softmax of ``s_0..s_t``.

    q: (B, Hq, 1, D) the learned query, k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nk, Dv).
    """
    s, vv = _scores(q, k, v, call.key_mask, call.scale)
    N = s.shape[-1]
    allowed = torch.ones(N, N, dtype=torch.bool, device=q.device).tril() & torch.isfinite(s).unsqueeze(-2)
    logits = s.unsqueeze(-2).expand(*s.shape[:2], N, N).masked_fill(~allowed, float("-inf"))
    w = torch.softmax(logits, dim=-1).masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    out = (w @ vv).to(q.dtype)
    return (out, w.to(q.dtype)) if call.return_weights else out


def _scan(s, vv, chunk: int, state: Optional[RecurrentState] = None):
    """Blocked prefix scan of the online-softmax triples, continuing ``state`` (its
    ``m, u, w``, None before the first step) if given; returns ``out`` and the final
    triple ``(m, u, w)``."""
    B, H, N = s.shape
    Dv = vv.shape[-1]
    C = max(1, min(int(chunk), N))
    nc = -(-N // C)
    pad = nc * C - N
    if pad:
        s = torch.nn.functional.pad(s, (0, pad), value=float("-inf"))
        vv = torch.nn.functional.pad(vv, (0, 0, 0, pad))
    sc = s.view(B, H, nc, C)
    vc = vv.view(B, H, nc, C, Dv)
    tril = torch.ones(C, C, dtype=torch.bool, device=s.device).tril()
    # intra-chunk: running max m_i and E_ij = exp(s_j - m_i) for j <= i
    m_loc = torch.cummax(sc, dim=-1).values  # (B, H, nc, C)
    m_loc_safe = m_loc.masked_fill(torch.isinf(m_loc), 0.0)
    # mask before the exp: for j > i, s_j - m_i may be large and exp would overflow (0 * inf = NaN in backward)
    e = torch.exp((sc.unsqueeze(-2) - m_loc_safe.unsqueeze(-1)).masked_fill(~tril, float("-inf")))  # (B, H, nc, C, C)
    num = e @ vc  # (B, H, nc, C, Dv)
    den = e.sum(-1)  # (B, H, nc, C)
    # chunk summaries (m_c, u_c, w_c) at each chunk's end, then a scan over chunks
    m_end, num_end, den_end = m_loc[..., -1], num[..., -1, :], den[..., -1]
    m_prev = s.new_full((B, H), float("-inf")) if state is None or state.m is None else state.m
    u_prev = s.new_zeros(B, H) if state is None or state.u is None else state.u
    w_prev = s.new_zeros(B, H, Dv) if state is None or state.w is None else state.w
    prev = []
    # unbind once: indexing inside the loop would give autograd a full-size zero gradient per chunk
    for m_c, den_c, num_c in zip(m_end.unbind(2), den_end.unbind(2), num_end.unbind(2)):
        prev.append((m_prev, u_prev, w_prev))
        m_new = torch.maximum(m_prev, m_c)
        ms = m_new.masked_fill(torch.isinf(m_new), 0.0)
        empty = torch.isinf(m_c)
        a = torch.exp(m_prev - ms)
        b = torch.exp(m_c.masked_fill(empty, 0.0) - ms).masked_fill(empty, 0.0)
        u_prev = u_prev * a + den_c * b
        w_prev = w_prev * a.unsqueeze(-1) + num_c * b.unsqueeze(-1)
        m_prev = m_new
    mp = torch.stack([p[0] for p in prev], dim=2).unsqueeze(-1)  # (B, H, nc, 1)
    up = torch.stack([p[1] for p in prev], dim=2).unsqueeze(-1)
    wp = torch.stack([p[2] for p in prev], dim=2).unsqueeze(-2)  # (B, H, nc, 1, Dv)
    M = torch.maximum(mp, m_loc)
    Ms = M.masked_fill(torch.isinf(M), 0.0)
    a = torch.exp(mp - Ms).masked_fill(torch.isinf(mp), 0.0)
    b = torch.exp(m_loc_safe - Ms).masked_fill(torch.isinf(m_loc), 0.0)
    numer = num * b.unsqueeze(-1) + wp * a.unsqueeze(-1)
    denom = den * b + up * a
    out = numer / denom.clamp_min(torch.finfo(s.dtype).tiny).unsqueeze(-1)
    out = out.masked_fill((denom == 0).unsqueeze(-1), 0.0).reshape(B, H, nc * C, Dv)[:, :, :N]
    return out, (m_prev, u_prev, w_prev)


@aaren.impl("scan", options=("chunk",), description="blocked prefix scan of (max, sum, weighted sum) triples")
def scan_attention(q, k, v, call):
    """The blocked prefix scan: O(N·C) time and memory per head."""
    s, vv = _scores(q, k, v, call.key_mask, call.scale)
    return _scan(s, vv, call.options.chunk)[0].to(q.dtype)


@aaren.decodes
class AarenDecoder(Decoder):
    """Decoding state: the online-softmax triple ``(m, u, w)`` per query head (a
    :class:`~attnzoo.kernels.caches.RecurrentState`): constant size."""

    state_size = "Dv + 2 per query head, constant in N"
    options = ("chunk",)

    def init_state(self, batch_size, kv_heads, head_dim, v_dim, *, dtype, device, max_len, options):
        return RecurrentState(m=None, u=None, w=None)

    def step(self, run, state, q, k, v, *, scale, impl, options):
        """Fold T new tokens into the triple; returns their T outputs ``(B, Hq, T, Dv)``."""
        s, vv = _scores(q, k, v, None, scale)
        out, (state.m, state.u, state.w) = _scan(s, vv, options.chunk, state)
        state.position += k.shape[2]
        return out.to(q.dtype)


@aaren.module_class
class AarenAttention(torch.nn.Module):
    """Aaren with its learned query token (one per head). Called like any method module,
    ``module(q, k, v, causal=True)``; the ``q`` argument is ignored (the query is learned),
    so inside :class:`attnzoo.Attention` the layer's query projection goes unused."""

    def __init__(self, heads: int, head_dim: int, kv_heads: Optional[int] = None, v_dim: Optional[int] = None,
                 impl: str = "auto"):
        super().__init__()
        self.query = torch.nn.Parameter(torch.randn(heads, head_dim) * head_dim**-0.5)
        self.impl = impl

    def _token(self, like):
        return self.query.to(like.dtype).unsqueeze(0).unsqueeze(2).expand(like.shape[0], -1, 1, -1)

    def forward(self, q, k, v, **kwargs):
        kwargs.setdefault("impl", self.impl)
        kwargs.setdefault("causal", True)
        kwargs.pop("cross", None)
        return aaren(self._token(k), k, v, **kwargs)

    def init_state(self, batch_size, kv_heads, head_dim, v_dim, *, dtype=torch.float32, device=None, max_len=None):
        return aaren.init_state(batch_size, kv_heads, head_dim, v_dim, dtype=dtype, device=device, max_len=max_len)

    def step(self, state, q, k, v, *, scale=None, impl="auto"):
        return aaren.step(state, self._token(k), k, v, scale=k.shape[-1] ** -0.5 if scale is None else scale,
                          impl=impl)

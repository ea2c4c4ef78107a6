"""LASP-2 and LASP-2H: sequence parallelism for linear attention and its hybrids.

"LASP-2: Rethinking Sequence Parallelism for Linear Attention and Its Hybrid" (Sun et
al., 2025). Linear attention carries a *memory state* of fixed size, ``F × Dv`` per head,
whatever the length, so a rank needs from the others only their states, not their keys
and values. With the sequence sharded in pieces ``[a_c, b_c)`` (one per rank,
contiguous, or two with the zig-zag layout) and a per-head decay λ (Lightning
Attention's; λ = 1 without decay):

    M_c    = Σ_{j in c} λ^(b_c - 1 - j) φ(k_j) v_jᵀ              this piece's state, at its end
    S_c    = Σ_{t : b_t <= a_c} λ^(a_c - b_t) M_t                   the state entering piece c
    o_i    = Σ_{j in c, j <= i} λ^(i-j) (φ(q_i)·φ(k_j)) v_j  +  λ^(i - a_c + 1) φ(q_i) S_c

The only communication is **one all-gather of the states M** (``P × pieces × B·H·F·Dv``,
independent of N), launched asynchronously and overlapped with the intra-piece part (the
first sum: Lightning's chunked scan, :func:`attnzoo.kernels.linear_scan.causal_linear`);
each rank then combines the states before its pieces. The backward is one all-gather of
the states' gradients ``dS_c`` (a custom ``autograd.Function``): ``dM_t = Σ_{c : b_t <=
a_c} λ^(a_c - b_t) dS_c``, which each rank sums for its own pieces. Noncausal: ``S = Σ_t
M_t`` for every piece, ``o_i = φ(q_i) S``.

The methods it runs (the same maths as the single-process ones, checked equal by the
tests): ``lightning`` (all its options; the default decays are TransNormerLLM's rule) and
``linear`` with the feature maps ``elu``, ``relu``, ``identity``, ``cosformer`` (global
positions, ``M = cosformer_len`` or N) or a callable, normalised (the state carries the
extra column of ones for the denominator) or NormAttention (``normalize=False``). [J]
FAVOR+ is not offered here (its random projection lives in the method); use Ulysses.

**LASP-2H** (:func:`lasp2h`): in a hybrid stack the linear layers run LASP-2 and the
softmax layers the paper's counterpart, one all-gather of K and V
(:func:`allgather_attention`: each rank attends its queries over the gathered prefix of
the sequence; the backward reduce-scatters dK and dV).

Bytes per rank (:func:`lasp2_bytes`): forward ``(P-1)·pieces·B·Hq·F·Dv'`` elements of
the compute dtype (``Dv' = Dv + 1`` normalised), the backward the same again — constant
in N, where ring attention's grow with N. Compute per rank O(n_r·C·F + n_r·F·Dv).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from .. import registry
from ..api import attention
from ..errors import AttentionInputError, UnsupportedPattern
from ..kernels.common import compute_dtype, repeat_kv
from ..kernels.linear_scan import causal_linear, feature_pair, finish, with_ones
from . import comm
from .layout import SequenceLayout, resolve_layout
from .ring import check_local

LASP2_METHODS = ("lightning", "linear")

_MAPS = {"identity": lambda x: x, "silu": F.silu, "elu": lambda x: F.elu(x) + 1, "relu": F.relu}


@dataclass(frozen=True)
class LinearForm:
    """What a linear-attention method computes, in the terms of the scan: the feature map
    ``φ(x, positions, is_query)``, the per-head decay (or None), the output and its eps."""

    phi: Callable
    decay: Optional[torch.Tensor]
    output: Optional[str]
    eps: float
    chunk: int
    features: int  # F per head dim D: the state is F x Dv'


def linear_form(method: str, q_heads: int, head_dim: int, seq_len: int, causal: bool, options: dict, dtype,
                device) -> LinearForm:
    """The :class:`LinearForm` of ``method`` with ``options`` (validated by the method's spec)."""
    if method not in LASP2_METHODS:
        raise AttentionInputError(f"lasp2 runs the linear-attention methods {', '.join(LASP2_METHODS)}, got "
                                  f"{method!r}; use ulysses_attention or ring_attention for other methods")
    spec = registry.get(method)
    if not spec.supports_pattern(causal, False):
        raise UnsupportedPattern(f"method {method!r} has no {'causal' if causal else 'noncausal'} self form; it "
                                 f"supports: {', '.join(spec.patterns)}")
    o = spec.resolve_options(options)
    if method == "lightning":
        fn = _MAPS[o.feature_map]
        return LinearForm(lambda x, pos, is_query: fn(x), lightning_decays(q_heads, options, dtype, device),
                          "rms" if o.output_norm else None, float(o.eps), int(o.chunk), 1)
    fm = o.feature_map
    if callable(fm):
        phi, feats = (lambda x, pos, is_query: fm(x)), None
    elif fm in ("elu", "relu", "identity"):
        fn = _MAPS[fm]
        phi, feats = (lambda x, pos, is_query: fn(x)), 1
    elif fm == "cosformer":
        M = float(o.cosformer_len or seq_len)
        if o.cosformer_len is not None and seq_len > o.cosformer_len:
            raise AttentionInputError(f"cosformer_len={o.cosformer_len} is shorter than the sequence ({seq_len})")

        def phi(x, pos, is_query):
            ang = (math.pi / 2) * pos.to(x.dtype).view(1, 1, -1, 1) / M
            r = F.relu(x)
            return torch.cat([r * torch.cos(ang), r * torch.sin(ang)], dim=-1)

        feats = 2
    else:
        raise AttentionInputError(f"lasp2: linear's feature_map {fm!r} is not supported here (elu, relu, identity, "
                                  "cosformer or a callable); use ulysses_attention for it")
    eps = 1e-6 if o.eps is None else float(o.eps)
    return LinearForm(phi, None, "normalize" if o.normalize else "rms", eps, int(o.chunk), feats)


def lightning_decays(q_heads: int, options: dict, dtype=torch.float64, device=None) -> torch.Tensor:
    """The per-head λ ``(Hq,)`` that ``lightning`` uses with ``options``, read from the
    method itself: [J] a two-token probe through :func:`attnzoo.attention` (identity
    features, no output norm: ``o_1 = λ (q_1·k_0) v_0`` with ``q_1 = k_0 = e_1``, ``k_1 =
    0``, ``v = 1``), so LASP-2 and Ulysses follow lightning's decay rule — its default
    schedule, ``layer_ratio``, explicit or learnable decays — without a copy of it."""
    probe = {**options, "feature_map": "identity", "output_norm": False}
    q = torch.zeros(1, q_heads, 2, 1, dtype=torch.float64, device=device)
    k = torch.zeros_like(q)
    q[:, :, 1, 0] = 1.0
    k[:, :, 0, 0] = 1.0
    out = attention(q, k, torch.ones_like(q), method="lightning", causal=True, **probe)
    return out[0, :, 1, 0].to(dtype)


def _piece_weights(layout: SequenceLayout, causal: bool, decay: Optional[torch.Tensor], heads: int, dtype, device):
    """``W (Np, Np, H)``: the weight of piece ``t``'s state in the state entering piece
    ``c`` (pieces numbered rank by rank, ``pieces_per_rank`` each, padding ones empty)."""
    ppr = layout.pieces_per_rank
    ranges = []
    for r in range(layout.world_size):
        ps = list(layout.pieces[r]) + [(0, 0)] * (ppr - len(layout.pieces[r]))
        ranges.extend(ps)
    a = torch.tensor([p[0] for p in ranges], dtype=dtype, device=device)
    b = torch.tensor([p[1] for p in ranges], dtype=dtype, device=device)
    nonempty = (b > a)
    if not causal:
        w = (nonempty.view(1, -1) & nonempty.view(-1, 1)).to(dtype)
        return w.unsqueeze(-1).expand(-1, -1, heads).contiguous()
    before = (b.view(1, -1) <= a.view(-1, 1)) & nonempty.view(1, -1) & nonempty.view(-1, 1)
    gap = (a.view(-1, 1) - b.view(1, -1)).clamp(min=0)  # a_c - b_t
    if decay is None:
        return before.to(dtype).unsqueeze(-1).expand(-1, -1, heads).contiguous()
    return torch.exp(torch.log(decay.to(dtype)).view(1, 1, -1) * gap.unsqueeze(-1)) * before.unsqueeze(-1)


class _CombineStates(torch.autograd.Function):
    """The states entering this rank's pieces from the all-gathered states (already in
    flight: ``work``); backward: one all-gather of their gradients."""

    @staticmethod
    def forward(ctx, m_local, gathered, work, weights, mine, group):
        work.wait()
        g = gathered.flatten(0, 1)  # (Np, B, H, F, Dv)
        ctx.args = (weights, mine, group)
        return torch.einsum("cth,tbhfd->cbhfd", weights[mine], g)

    @staticmethod
    def backward(ctx, ds):
        weights, mine, group = ctx.args
        ds_all = comm.all_gather_equal(ds.contiguous(), group, op="lasp2_bwd").flatten(0, 1)
        dm = torch.einsum("cth,cbhfd->tbhfd", weights[:, mine], ds_all)
        return dm, None, None, None, None, None


def lasp2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, *, method: str = "lightning",
          causal: bool = True, layout: Union[str, SequenceLayout] = "contiguous", **options) -> torch.Tensor:
    """LASP-2: a linear-attention method over the sequence sharded across ``group``.

    Args:
        q: ``(B, Hq, n_r, D)``, k ``(B, Hkv, n_r, D)``, v ``(B, Hkv, n_r, Dv)``: this rank's
            tokens (self-attention; GQA allowed).
        method, **options: ``"lightning"`` or ``"linear"`` and their options.
        causal: the causal form (lightning is causal only).
        layout: ``"contiguous"`` (the paper's), ``"zigzag"`` or a :class:`SequenceLayout`.

    Returns this rank's ``(B, Hq, n_r, Dv)``, equal to the method on the whole sequence;
    differentiable in q, k, v (and in the method's tensor options, e.g. decays given as a
    tensor, through the local part).
    """
    check_local(q, k, v, "lasp2")
    world, rank = comm.world_and_rank(group)
    lay = resolve_layout(layout, q.shape[2], group)
    ct = compute_dtype(q.dtype)
    B, Hq, n, D = q.shape
    form = linear_form(method, Hq, D, lay.seq_len, causal, options, ct, q.device)
    pieces = lay.local_ranges(rank)
    ppr = lay.pieces_per_rank
    feats, states, vals = [], [], []
    log_l = None if form.decay is None else torch.log(form.decay.to(ct)).view(1, Hq, 1, 1)
    for a, b, ls, le in pieces:
        if b == a:  # an empty piece (zig-zag with N < 2P): a zero state
            states.append(None)
            feats.append(None)
            vals.append(None)
            continue
        fq, fk = feature_pair(q[:, :, ls:le], k[:, :, ls:le], None, form.phi, position_offset=a)
        vv = repeat_kv(v[:, :, ls:le], Hq).to(fq.dtype)
        vv = with_ones(vv) if form.output == "normalize" else vv
        fk_end = fk if (log_l is None or not causal) else fk * torch.exp(
            log_l * (b - 1 - torch.arange(a, b, device=q.device)).to(ct).view(1, 1, -1, 1))
        states.append(fk_end.transpose(-1, -2) @ vv)  # (B, Hq, F, Dv'): the piece's state at its end
        feats.append((fq, fk))
        vals.append(vv)
    Fd, Dvp = next(s.shape[-2:] for s in states if s is not None)
    states = [q.new_zeros(B, Hq, Fd, Dvp, dtype=ct) if s is None else s for s in states]
    while len(states) < ppr:  # a rank with fewer pieces sends empty states (a custom layout)
        states.append(q.new_zeros(B, Hq, Fd, Dvp, dtype=ct))
    m_local = torch.stack(states)  # (ppr, B, Hq, F, Dv')
    gathered, work = comm.all_gather_equal(m_local.detach(), group, op="lasp2", async_op=True)
    # the intra-piece part runs while the states travel
    intra = [causal_linear(f[0], f[1], vv, decay=form.decay, chunk=form.chunk) if causal and f is not None else None
             for f, vv in zip(feats, vals)]
    weights = _piece_weights(lay, causal, form.decay, Hq, ct, q.device)
    mine = torch.arange(rank * ppr, rank * ppr + ppr, device=q.device)
    s_in = _CombineStates.apply(m_local, gathered, work, weights, mine, group)
    outs = []
    for c, ((a, b, ls, le), f, part) in enumerate(zip(pieces, feats, intra)):
        if f is None:
            continue
        fq = f[0]
        if causal:
            fq_in = fq if log_l is None else fq * torch.exp(log_l * torch.arange(1, b - a + 1, device=q.device)
                                                             .to(ct).view(1, 1, -1, 1))
            out = part + fq_in @ s_in[c]
        else:
            out = fq @ s_in[c]
        outs.append(finish(out, form.output, form.eps).to(q.dtype))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def lasp2_bytes(layout: SequenceLayout, *, batch: int, q_heads: int, features: int, v_dim: int,
                compute_itemsize: int, normalize: bool = False, backward: bool = False) -> int:
    """Bytes each rank sends in :func:`lasp2`: the all-gather of its states,
    ``(P-1)·pieces·B·Hq·F·Dv'·itemsize`` (``Dv' = Dv + 1`` when normalised), twice with the
    backward. No N in it."""
    P = layout.world_size
    per = layout.pieces_per_rank * batch * q_heads * features * (v_dim + (1 if normalize else 0)) * compute_itemsize
    return (P - 1) * per * (2 if backward else 1)


# ------------------------------------------------------------------ LASP-2H: softmax layers


class _AllGatherSeq(torch.autograd.Function):
    """All-gather along the sequence (rank order); backward: reduce-scatter."""

    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.args = (sizes, group)
        return comm.all_gather_any(x, sizes, 2, group, op="allgather_kv")

    @staticmethod
    def backward(ctx, g):
        sizes, group = ctx.args
        return comm.reduce_scatter_any(g, sizes, 2, group, op="allgather_kv_bwd"), None, None


def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, *, method: str = "softmax",
                        causal: bool = False, scale: Optional[float] = None,
                        layout: Union[str, SequenceLayout] = "contiguous", impl: str = "auto",
                        **options) -> torch.Tensor:
    """LASP-2H's softmax layers: one all-gather of K and V, then each rank attends its
    queries over the keys they may see (causal: the prefix up to each piece's end, as
    lower-right causal cross-attention; noncausal: all of them).

    ``method`` must be exact softmax (``softmax``, with its options: ALiBi, soft-capping,
    ``impl``): [J] other methods are not offered because their rows over a prefix need not
    equal their rows over the whole sequence (length-dependent biases, row-coupled
    normalisations); use Ulysses for them. Bytes per rank: forward ``(P-1)·n_r·B·Hkv·(D+Dv)``
    elements, backward ``(N - n_r)·B·Hkv·(D+Dv)`` (:func:`allgather_bytes`).
    """
    check_local(q, k, v, "allgather_attention")
    spec = registry.get(method)
    if not spec.exact:
        raise AttentionInputError(f"allgather_attention runs exact softmax methods; {method!r} is not one (use "
                                  "ulysses_attention, which runs any method on whole sequences)")
    world, rank = comm.world_and_rank(group)
    lay = resolve_layout(layout, q.shape[2], group)
    D = k.shape[-1]
    kv = _AllGatherSeq.apply(torch.cat([k, v], dim=-1), lay.lengths(), group)
    if not lay.is_rank_ordered():
        kv = kv.index_select(2, torch.argsort(lay.rank_order(q.device)))
    K, V = kv[..., :D], kv[..., D:]
    if not causal:
        return attention(q, K, V, method=method, impl=impl, causal=False, scale=scale, cross=True, **options)
    outs = []
    for a, b, ls, le in lay.local_ranges(rank):
        if b > a:  # lower-right alignment: query a + i sees keys <= a + i
            outs.append(attention(q[:, :, ls:le], K[:, :, :b], V[:, :, :b], method=method, impl=impl, causal=True,
                                  scale=scale, cross=a > 0, **options))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def allgather_bytes(layout: SequenceLayout, rank: int, *, batch: int, kv_heads: int, head_dim: int, v_dim: int,
                    itemsize: int, backward: bool = False) -> int:
    """Bytes rank ``rank`` sends in :func:`allgather_attention`: its K/V to the ``P - 1``
    others, and in the backward the gradients of the others' K/V, ``(N - n_r)`` tokens."""
    P, n, N = layout.world_size, layout.local_len(rank), layout.seq_len
    per_token = batch * kv_heads * (head_dim + v_dim) * itemsize
    return ((P - 1) * n + ((N - n) if backward else 0)) * per_token


def lasp2h(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, *, method: str, causal: bool,
           scale: Optional[float] = None, layout: Union[str, SequenceLayout] = "contiguous", impl: str = "auto",
           **options) -> torch.Tensor:
    """LASP-2H: a layer of a hybrid stack, sequence-parallel — linear-attention methods by
    :func:`lasp2` (states all-gathered), exact softmax by :func:`allgather_attention`
    (K/V all-gathered)."""
    if method in LASP2_METHODS:
        return lasp2(q, k, v, group, method=method, causal=causal, layout=layout, **options)
    return allgather_attention(q, k, v, group, method=method, causal=causal, scale=scale, layout=layout, impl=impl,
                               **options)

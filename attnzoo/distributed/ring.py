"""Ring attention: exact softmax attention over a sequence sharded across ranks.

"Ring Attention with Blockwise Transformers for Near-Infinite Context" (Liu, Zaharia and
Abbeel, 2023), the baseline LASP-2 compares against ("LASP-2: Rethinking Sequence
Parallelism for Linear Attention and Its Hybrid"). Each of the ``P`` ranks keeps its
queries; the key/value blocks travel around the ring: at step ``t`` rank ``r`` holds
the block of rank ``r - t`` and, while it computes on it, already sends it to rank
``r + 1`` and receives the next one from ``r - 1`` (``isend``/``irecv`` posted together,
``batch_isend_irecv``, waited on after the compute). Each block gives a partial softmax
result and its log-sum-exp, merged exactly as split-K merges chunks
(:func:`attnzoo.kernels.splitk.merge_partials`):

    lse = log(e^lse_a + e^lse_b),   o = e^(lse_a - lse) o_a + e^(lse_b - lse) o_b

Causal attention skips the (query piece, key piece) pairs entirely above the diagonal
and masks only the diagonal ones; with the zig-zag layout
(:meth:`SequenceLayout.zigzag`: rank ``r`` holds chunks ``r`` and ``2P-1-r``) every rank
does about the same work at every step.

The backward pass (a custom ``autograd.Function``) runs the ring again: the K/V blocks
go round once more, each with an accumulator of its ``dK``/``dV`` that every rank adds
its share to (the FlashAttention backward per block, from the saved output and
log-sum-exp: ``P = exp(S - lse)``, ``dV += Pᵀ dO``, ``dS = P ⊙ (dO Vᵀ - rowsum(dO ⊙ O))``,
``dQ += dS K·scale``, ``dK += dSᵀ Q·scale``); after ``P`` hops the accumulator is home.

Each (query piece, key piece) pair runs on torch's fused CPU flash-attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward, which return and
take the log-sum-exp) when ``D == Dv``; otherwise, and on CUDA, on the PyTorch blocks
below (query rows in chunks, the same maths). [J] The fused kernel is a private ATen op:
its absence falls back to the PyTorch blocks.

Inputs are the local shards (self-attention: q, k, v sharded alike), ``q (B, Hq, n_r,
D)``, ``k (B, Hkv, n_r, D)``, ``v (B, Hkv, n_r, Dv)``, GQA allowed. Per rank: time
O(N·n_r·D) (causal about half), memory O(n_r·D + rows·n_r) (query rows in chunks of
at most 4 Mi scores), and bytes sent (:func:`ring_bytes`) forward
``Σ_{t<P-1} |KV_{r-t}|`` ≈ ``(P-1)/P · N·B·Hkv·(D+Dv)`` elements — it grows with N.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..errors import AttentionInputError, fmt_shape
from ..kernels.common import BLOCK_ELEMENTS, compute_dtype
from ..kernels.splitk import merge_partials
from . import comm
from .layout import SequenceLayout, resolve_layout

FULL, DIAG, NONE = "full", "diag", "none"


def pair_kind(causal: bool, q_range, k_range) -> str:
    """How a query piece ``[qa, qb)`` sees a key piece ``[ka, kb)`` (global positions):
    every pair, the causal diagonal only, or nothing."""
    (qa, qb), (ka, kb) = q_range, k_range
    if qb <= qa or kb <= ka:
        return NONE
    if not causal or kb - 1 <= qa:
        return FULL
    if ka > qb - 1:
        return NONE
    return DIAG


def _rows(batch_heads: int, nk: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(1, batch_heads * nk))


def _scores(qc, kg, scale, kind, q0, k0):
    """``(q·scale) kᵀ`` for query rows starting at global ``q0``, keys at ``k0``; the
    diagonal pair masked to ``k <= q``."""
    s = (qc * scale) @ kg.transpose(-1, -2)
    if kind == DIAG:
        i = torch.arange(qc.shape[-2], device=qc.device).view(-1, 1) + q0
        j = torch.arange(kg.shape[-2], device=qc.device).view(1, -1) + k0
        s = s.masked_fill(j > i, float("-inf"))
    return s


def block_forward(qg, k, v, scale: float, kind: str, q0: int, k0: int):
    """One (query piece, key block) pair: ``qg (B, Hkv, G, nq, D)``, ``k (B, Hkv, nk, D)``,
    ``v (B, Hkv, nk, Dv)`` in the compute dtype -> ``out (B, Hkv, G, nq, Dv)`` and
    ``lse (B, Hkv, G, nq)`` (``-inf`` for rows that see nothing, whose out is 0)."""
    B, Hkv, G, nq, _ = qg.shape
    kg, vg = k.unsqueeze(2), v.unsqueeze(2)
    outs, lses = [], []
    rows = _rows(B * Hkv * G, k.shape[2])
    for s in range(0, nq, rows):
        sc = _scores(qg[:, :, :, s:s + rows], kg, scale, kind, q0 + s, k0)
        m = sc.amax(dim=-1, keepdim=True)
        m = m.masked_fill(torch.isinf(m), 0.0)
        p = torch.exp(sc - m)
        denom = p.sum(dim=-1, keepdim=True)
        outs.append((p @ vg) / denom.clamp(min=torch.finfo(p.dtype).tiny))
        lses.append((m + torch.log(denom)).squeeze(-1))
    return torch.cat(outs, dim=3), torch.cat(lses, dim=3)


def block_backward(qg, k, v, do, lse, delta, scale: float, kind: str, q0: int, k0: int):
    """The FlashAttention backward of one pair, from the final ``lse`` and
    ``delta = rowsum(dO ⊙ O)``: returns ``dq (B, Hkv, G, nq, D)``, ``dk (B, Hkv, nk, D)``,
    ``dv (B, Hkv, nk, Dv)`` (GQA: summed over the group)."""
    B, Hkv, G, nq, _ = qg.shape
    kg, vg = k.unsqueeze(2), v.unsqueeze(2)
    dqs = []
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    rows = _rows(B * Hkv * G, k.shape[2])
    for s in range(0, nq, rows):
        qc = qg[:, :, :, s:s + rows]
        sc = _scores(qc, kg, scale, kind, q0 + s, k0)
        lc = lse[:, :, :, s:s + rows].unsqueeze(-1)
        p = torch.exp(sc - lc.masked_fill(torch.isinf(lc), 0.0))
        doc = do[:, :, :, s:s + rows]
        dv += (p.transpose(-1, -2) @ doc).sum(dim=2)
        ds = p * (doc @ vg.transpose(-1, -2) - delta[:, :, :, s:s + rows].unsqueeze(-1))
        dqs.append((ds @ kg) * scale)
        dk += (ds.transpose(-1, -2) @ qc).sum(dim=2) * scale
    return torch.cat(dqs, dim=3), dk, dv


_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def flash_ok(kind: str, q_range, k_range, head_dim: int, v_dim: int, device) -> bool:
    """Whether a pair runs on torch's fused CPU flash-attention kernel (which returns the
    log-sum-exp and takes it back in its backward): [J] on the CPU with ``D == Dv``, for
    every visible pair except a diagonal one between different ranges (custom layouts),
    which the PyTorch kernel above serves; so do CUDA and ``D != Dv``."""
    return (_FLASH is not None and _FLASH_BWD is not None and device.type == "cpu" and head_dim == v_dim
            and (kind == FULL or tuple(q_range) == tuple(k_range)))


def _heads(x, groups: int):
    """``(B, Hkv, n, D)`` -> ``(B, Hkv·G, n, D)`` (each K/V head repeated for its group)."""
    B, H, n, D = x.shape
    return x if groups == 1 else x.unsqueeze(2).expand(B, H, groups, n, D).reshape(B, H * groups, n, D)


def flash_forward(qg, k, v, scale: float, kind: str):
    """:func:`block_forward` on the fused kernel (``is_causal`` for a diagonal pair)."""
    B, Hkv, G, nq, D = qg.shape
    o, lse = _FLASH(qg.reshape(B, Hkv * G, nq, D), _heads(k, G), _heads(v, G), 0.0, kind == DIAG, scale=scale)
    return o.view(B, Hkv, G, nq, -1), lse.view(B, Hkv, G, nq).to(o.dtype)


def flash_backward(qg, k, v, do, out, lse, scale: float, kind: str):
    """:func:`block_backward` on the fused kernel, from the final ``out`` and ``lse``."""
    B, Hkv, G, nq, D = qg.shape
    nk = k.shape[2]
    dq, dk, dv = _FLASH_BWD(do.reshape(B, Hkv * G, nq, -1), qg.reshape(B, Hkv * G, nq, D), _heads(k, G),
                            _heads(v, G), out.reshape(B, Hkv * G, nq, -1), lse.reshape(B, Hkv * G, nq), 0.0,
                            kind == DIAG, scale=scale)
    return dq.view(B, Hkv, G, nq, D), dk.view(B, Hkv, G, nk, D).sum(2), dv.view(B, Hkv, G, nk, -1).sum(2)


def _merge(out, lse, rows, o_p, l_p):
    """Merge a partial ``(o_p, l_p)`` into the running result's local rows ``[a, b)``."""
    a, b = rows
    o_old, l_old = out[:, :, :, a:b], lse[:, :, :, a:b]
    ls = torch.stack([l_old, l_p], dim=-1)
    out[:, :, :, a:b] = merge_partials(torch.stack([o_old, o_p], dim=-2), ls, dim=ls.ndim - 1)
    lse[:, :, :, a:b] = torch.logsumexp(ls, dim=-1)


def _pack(*ts):
    return torch.cat([t.reshape(-1) for t in ts])


def _unpack(buf, shapes):
    out, off = [], 0
    for shape in shapes:
        n = 1
        for s in shape:
            n *= s
        out.append(buf[off:off + n].view(shape))
        off += n
    return out


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, layout: SequenceLayout, group):
        world, rank = comm.world_and_rank(group)
        B, Hq, n, D = q.shape
        Hkv, Dv = k.shape[1], v.shape[3]
        G = Hq // Hkv
        ct = compute_dtype(q.dtype)
        qg = q.to(ct).reshape(B, Hkv, G, n, D)
        out = torch.zeros(B, Hkv, G, n, Dv, dtype=ct, device=q.device)
        lse = torch.full((B, Hkv, G, n), float("-inf"), dtype=ct, device=q.device)
        nxt, prv = (rank + 1) % world, (rank - 1) % world
        q_ranges = layout.local_ranges(rank)
        cur, src = _pack(k, v), rank
        for t in range(world):
            reqs, incoming = [], None
            if t < world - 1:  # post the next block's transfer first: it runs during the compute below
                m = layout.local_len((src - 1) % world)
                incoming = torch.empty(B * Hkv * m * (D + Dv), dtype=k.dtype, device=k.device)
                reqs = comm.exchange([(nxt, cur)], [(prv, incoming)], group, op="ring_kv", tag=0)
            nk = layout.local_len(src)
            kb, vb = (x.to(ct) for x in _unpack(cur, [(B, Hkv, nk, D), (B, Hkv, nk, Dv)]))
            for qa, qb, qls, qle in q_ranges:
                for ka, kb_, kls, kle in layout.local_ranges(src):
                    kind = pair_kind(causal, (qa, qb), (ka, kb_))
                    if kind == NONE:
                        continue
                    if flash_ok(kind, (qa, qb), (ka, kb_), D, Dv, q.device):
                        o_p, l_p = flash_forward(qg[:, :, :, qls:qle], kb[:, :, kls:kle], vb[:, :, kls:kle], scale,
                                                 kind)
                    else:
                        o_p, l_p = block_forward(qg[:, :, :, qls:qle], kb[:, :, kls:kle], vb[:, :, kls:kle], scale,
                                                 kind, qa, ka)
                    _merge(out, lse, (qls, qle), o_p, l_p)
            comm.wait_all(reqs)
            if incoming is not None:
                cur, src = incoming, (src - 1) % world
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (scale, causal, layout, group)
        return out.reshape(B, Hq, n, Dv).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        scale, causal, layout, group = ctx.args
        world, rank = comm.world_and_rank(group)
        B, Hq, n, D = q.shape
        Hkv, Dv = k.shape[1], v.shape[3]
        G = Hq // Hkv
        ct = out.dtype
        qg = q.to(ct).reshape(B, Hkv, G, n, D)
        do = dout.to(ct).reshape(B, Hkv, G, n, Dv)
        delta = (do * out).sum(dim=-1)
        dq = torch.zeros_like(qg)
        nxt, prv = (rank + 1) % world, (rank - 1) % world
        q_ranges = layout.local_ranges(rank)
        cur, src = _pack(k, v), rank
        dkv_reqs, dkv_in, dkv_out = [], None, None
        for t in range(world):
            reqs, incoming = [], None
            if t < world - 1:
                m = layout.local_len((src - 1) % world)
                incoming = torch.empty(B * Hkv * m * (D + Dv), dtype=k.dtype, device=k.device)
                reqs = comm.exchange([(nxt, cur)], [(prv, incoming)], group, op="ring_kv", tag=0)
            nk = layout.local_len(src)
            shapes = [(B, Hkv, nk, D), (B, Hkv, nk, Dv)]
            kb, vb = (x.to(ct) for x in _unpack(cur, shapes))
            dk = torch.zeros_like(kb)
            dv = torch.zeros_like(vb)
            for qa, qb, qls, qle in q_ranges:
                for ka, kb_, kls, kle in layout.local_ranges(src):
                    kind = pair_kind(causal, (qa, qb), (ka, kb_))
                    if kind == NONE:
                        continue
                    if flash_ok(kind, (qa, qb), (ka, kb_), D, Dv, q.device):
                        dq_p, dk_p, dv_p = flash_backward(qg[:, :, :, qls:qle], kb[:, :, kls:kle], vb[:, :, kls:kle],
                                                          do[:, :, :, qls:qle], out[:, :, :, qls:qle],
                                                          lse[:, :, :, qls:qle], scale, kind)
                    else:
                        dq_p, dk_p, dv_p = block_backward(qg[:, :, :, qls:qle], kb[:, :, kls:kle],
                                                          vb[:, :, kls:kle], do[:, :, :, qls:qle],
                                                          lse[:, :, :, qls:qle], delta[:, :, :, qls:qle], scale, kind,
                                                          qa, ka)
                    dq[:, :, :, qls:qle] += dq_p
                    dk[:, :, kls:kle] += dk_p
                    dv[:, :, kls:kle] += dv_p
            if world > 1:
                if t > 0:  # the accumulator of this block, from the ranks that held it before
                    comm.wait_all(dkv_reqs)
                    dk_in, dv_in = _unpack(dkv_in, shapes)
                    dk, dv = dk + dk_in, dv + dv_in
                dkv_out = _pack(dk, dv)
                m = layout.local_len((src - 1) % world)
                dkv_in = torch.empty(B * Hkv * m * (D + Dv), dtype=ct, device=k.device)
                dkv_reqs = comm.exchange([(nxt, dkv_out)], [(prv, dkv_in)], group, op="ring_dkv", tag=1)
            comm.wait_all(reqs)
            if incoming is not None:
                cur, src = incoming, (src - 1) % world
        if world > 1:  # after P hops this rank's own accumulator is back, complete
            comm.wait_all(dkv_reqs)
            dk, dv = _unpack(dkv_in, [(B, Hkv, n, D), (B, Hkv, n, Dv)])
        return (dq.reshape(B, Hq, n, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None)


def check_local(q, k, v, name: str) -> None:
    """Local shards of self-attention: 4-D, same batch and length, GQA heads, same dtype."""
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise AttentionInputError(f"{name}: {arg} must be a 4-D tensor (B, H, n_local, D), got "
                                      f"{fmt_shape(t) if isinstance(t, torch.Tensor) else type(t).__name__}")
    B, Hq, n, D = q.shape
    if k.shape[0] != B or v.shape[0] != B or k.shape[2] != n or v.shape[2] != n:
        raise AttentionInputError(f"{name}: q, k and v must be local shards of the same sequence (same batch and "
                                  f"length), got q {fmt_shape(q)}, k {fmt_shape(k)}, v {fmt_shape(v)}")
    if k.shape[3] != D or v.shape[1] != k.shape[1] or Hq % k.shape[1]:
        raise AttentionInputError(f"{name}: expected k (B, Hkv, n, {D}) and v (B, Hkv, n, Dv) with Hq % Hkv == 0, "
                                  f"got q {fmt_shape(q)}, k {fmt_shape(k)}, v {fmt_shape(v)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise AttentionInputError(f"{name}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, *, causal: bool = False,
                   scale: Optional[float] = None, layout: Union[str, SequenceLayout] = "contiguous") -> torch.Tensor:
    """Exact softmax self-attention over the sequence sharded across ``group``.

    Args:
        q: ``(B, Hq, n_r, D)``, this rank's queries; k ``(B, Hkv, n_r, D)``, v ``(B, Hkv,
            n_r, Dv)``: its keys and values (the same tokens).
        group: the process group (default: the world).
        causal: causal self-attention over the global positions.
        scale: default ``D ** -0.5``.
        layout: ``"contiguous"``, ``"zigzag"`` (load-balanced causal) or a
            :class:`SequenceLayout`; a string costs one all-reduce of an integer.

    Returns ``(B, Hq, n_r, Dv)``: this rank's rows of ``softmax(QKᵀ·scale) V``. Differentiable
    in q, k, v (the backward runs the ring again).
    """
    check_local(q, k, v, "ring_attention")
    lay = resolve_layout(layout, q.shape[2], group)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    return _RingAttention.apply(q, k, v, scale, bool(causal), lay, group)


def ring_bytes(layout: SequenceLayout, rank: int, *, batch: int, kv_heads: int, head_dim: int, v_dim: int,
               itemsize: int, compute_itemsize: Optional[int] = None, backward: bool = False) -> int:
    """Bytes rank ``rank`` sends in :func:`ring_attention`: forward, the ``P - 1`` K/V
    blocks it forwards, ``Σ_{t=0}^{P-2} n_{(r-t) mod P} · B·Hkv·(D+Dv)·itemsize``
    (``(P-1)/P · N·B·Hkv·(D+Dv)·itemsize`` for even shards); the backward sends those
    again plus ``P`` dK/dV accumulators, one per block, ``N·B·Hkv·(D+Dv)·compute_itemsize``."""
    P, n = layout.world_size, layout.lengths()
    per_token = batch * kv_heads * (head_dim + v_dim)
    fwd = sum(n[(rank - t) % P] for t in range(P - 1)) * per_token * itemsize
    if not backward:
        return fwd
    return 2 * fwd + (sum(n) if P > 1 else 0) * per_token * (compute_itemsize or itemsize)

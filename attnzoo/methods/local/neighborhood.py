"""Neighborhood attention (NATTEN), 1-D and 2-D, with dilation.

    N(i) = the kernel_size nearest neighbours of i (per axis) on i's dilated sub-grid
    O_i  = sum_{j in N(i)} softmax_j(scale * q_i·k_j) v_j          (masked pairs dropped)

Papers: "Neighborhood Attention Transformer" (Hassani et al., CVPR 2023),
"Dilated Neighborhood Attention Transformer" (Hassani & Shi, 2022) and "Faster
Neighborhood Attention: Reducing the O(n^2) Cost of Self Attention at the
Threadblock Level" (Hassani et al., NeurIPS 2024).

The neighbourhood, per axis of length ``n`` with kernel ``k`` and dilation ``d``
(the definition lives once, in :func:`neighborhood_mask`, also
``attnzoo.masks.neighborhood_mask``):

* dilation splits the axis into ``d`` sub-sequences ``{g, g + d, g + 2d, ...}``;
  query ``i`` lives in sub-sequence ``g = i mod d`` at sub-position ``p = i // d``,
  and that sub-sequence has length ``L_g = ceil((n - g) / d)``;
* the window on it starts at ``s = clamp(p - k // 2, 0, L_g - k)`` and holds the
  sub-positions ``s, ..., s + k - 1``, i.e. the tokens ``g + d·(s + t)``. At the
  borders the window *shifts* (it is not cropped), as in NATTEN, so every query sees
  exactly ``k`` keys per axis;
* 2-D (``grid=(H, W)``, tokens row-major): the rule on rows and on columns, the
  neighbourhood is their product, ``k_h · k_w`` keys;
* 1-D causal (NATTEN's causal mask): query ``i`` sees ``i, i - d, ..., i - (k-1)·d``
  (those ``>= 0``; fewer at the very start, the window never shifts forward).

Then it is softmax attention restricted to those keys (combined with ``mask`` and
the key padding; a query with nothing visible gives zeros).

Judgement calls:

* [J] A window longer than its axis (``kernel_size > n``; e.g. the default
  ``kernel_size=7`` on a sequence of 1 to 6 tokens) is clamped to the axis, so every
  query sees ``min(kernel_size, n)`` keys per axis — the whole axis. NATTEN raises here;
  clamping lets the defaults run on any length and is what "the k nearest" means when
  fewer than k exist.
* [J] With dilation, every dilated sub-sequence must hold a full (clamped) window,
  ``n // d >= min(k, n)`` (NATTEN's ``kernel_size * dilation <= n``); otherwise
  :class:`AttentionInputError` says so. Causal 1-D has no such requirement: its
  windows are already partial at the start, and decoding must work from the first token.
* [J] An even ``kernel_size`` is allowed: the window ``[p - k/2, p + k/2 - 1]`` has one
  more neighbour before the query than after it (before shifting at the borders).
* [J] ``kernel_size`` and ``dilation`` may be ``(rows, cols)`` pairs in 2-D.
* [J] Self-attention only (the neighbours are positions of the query's own sequence):
  the cross patterns are not in the spec. 2-D has no causal form: ``causal=True`` with
  a ``grid`` raises :class:`AttentionInputError`.
* [J] A dense ``mask`` / mask_mod and the key padding are combined by AND with the
  neighbourhood; the gather path reads the mask only at the gathered (i, j) pairs (a
  mask_mod is evaluated there directly, never on N×N).

Complexity: time O(N·k·D) in 1-D and O(N·k²·D) in 2-D for ``gather``; memory
O(N·k) / O(N·k²) (the softmax weights over the neighbours, saved for the backward),
plus gather blocks of at most ~16 MiB. The reference builds the dense N×N mask: O(N²).

Implementations:

* ``reference`` — dense masked softmax with the mask from ``neighborhood_mask`` via
  ``dense_mask`` (the definition); can return the N×N weights.
* ``gather`` — per query, the indices of its ``k`` (``k²``) keys from integer
  arithmetic, K and V rows gathered in blocks of queries, a softmax over the
  neighbours, a weighted sum of the gathered V. A custom autograd function with the
  analytic backward (the gradients of K and V are ``index_add``-ed into the token dim),
  so no N×N tensor exists in the forward or the backward. GQA groups the query heads
  over each K/V head without copying K and V.
* ``flex`` — FlexAttention with the same mask_mod (CPU: inference only).
* decoding (1-D causal): a ring buffer of the last ``(kernel_size - 1)·dilation + 1``
  keys and values — constant memory — and each new token attends to its causal
  neighbours in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from ...errors import AttentionInputError, fmt_shape
from ...kernels.caches import Decoder
from ...kernels.common import BLOCK_ELEMENTS, compute_dtype, int_pair
from ...kernels.flex import flex_unsupported
from ...kernels.masking import MaskMod
from ...kernels.windows import pattern_flex, pattern_reference
from ...registry import MethodOptions, method

# ------------------------------------------------------------------------------ pattern


def _as_pair(name: str, value, dims: int) -> tuple:
    """``value`` (an int, or a sequence of ``dims`` ints) as a tuple of positive ints."""
    vals = tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims
    if len(vals) != dims or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in vals):
        shape = "a positive int" if dims == 1 else "a positive int or a pair of positive ints (rows, cols)"
        raise AttentionInputError(f"neighborhood: {name} must be {shape}, got {value!r}")
    return vals


def _grid_of(grid) -> tuple:
    """``grid`` as a pair of positive ints ``(H, W)``."""
    return int_pair("neighborhood: grid", grid)


def neighborhood_mask(kernel_size, dilation=1, grid=None, causal: bool = False, length: Optional[int] = None) -> MaskMod:
    """Neighborhood attention (NATTEN; "Neighborhood Attention Transformer",
    "Dilated Neighborhood Attention Transformer"), 1-D or 2-D, with dilation.

    Dilation ``d`` splits the positions of an axis into ``d`` sub-sequences (same index
    modulo ``d``); a query attends only within its own sub-sequence, to the
    ``kernel_size`` positions nearest to it there. At the borders the window *shifts*
    instead of being cropped, so every query sees exactly ``kernel_size`` keys per axis:
    on a sub-sequence of length ``L`` the query at sub-position ``p`` sees sub-positions
    ``[s, s + k)`` with ``s = clamp(p - k // 2, 0, L - k)``.

    * 1-D noncausal: give ``length`` (N), needed for the border shift.
    * 1-D ``causal=True``: query ``i`` sees ``j = i, i - d, ..., i - (k - 1)·d`` (those
      ``>= 0``; fewer at the very start, no shifting forward). ``length`` is not needed.
    * 2-D: ``grid=(H, W)``, tokens in row-major order, the rule above on each axis;
      ``kernel_size`` and ``dilation`` may be ints or ``(rows, cols)`` pairs. Noncausal only.

    A window longer than its axis (``kernel_size > N``, e.g. the defaults on a short
    sequence) is clamped to the axis: every query then sees the whole axis. With
    dilation, every sub-sequence must hold a full window (``N // d >= kernel_size``),
    otherwise this raises. The returned function carries the resolved parameters as
    attributes ``kernel`` (per axis, clamped), ``dilation`` (per axis), ``grid``,
    ``causal`` and ``length``, and ``cache_key`` (all of them).
    """
    if grid is not None:
        gh, gw = _grid_of(grid)
        if causal:
            raise AttentionInputError(
                f"neighborhood attention on a 2-D grid (grid={grid!r}) has no causal form; "
                "use causal=False, or a 1-D sequence (grid=None) for causal neighborhood attention"
            )
        if length is not None and int(length) != gh * gw:
            raise AttentionInputError(
                f"neighborhood: grid={grid!r} has {gh * gw} cells but the sequence has length {length}; "
                "tokens must be the H·W grid cells in row-major order"
            )
        axes = ((gh, "rows (H)"), (gw, "cols (W)"))
        kernels, dils = _as_pair("kernel_size", kernel_size, 2), _as_pair("dilation", dilation, 2)
    else:
        kernels, dils = _as_pair("kernel_size", kernel_size, 1), _as_pair("dilation", dilation, 1)
        if causal:
            axes = None
        else:
            if length is None:
                raise AttentionInputError(
                    "neighborhood_mask: 1-D noncausal neighborhood attention needs length=N (the border windows shift)"
                )
            if int(length) < 1:
                raise AttentionInputError(f"neighborhood: length must be a positive int, got {length!r}")
            axes = ((int(length), "sequence"),)

    if axes is not None:  # clamp the window to its axis; every dilated sub-sequence must hold it
        clamped = []
        for (n, what), k, d in zip(axes, kernels, dils):
            k = min(k, n)
            if n // d < k:
                raise AttentionInputError(
                    f"neighborhood attention: kernel_size={k} with dilation={d} does not fit the {what} axis of "
                    f"length {n}: it splits into {d} dilated sub-sequences, the shortest of length {n // d} < "
                    f"kernel_size {k}; every query must see kernel_size neighbours on its sub-sequence, so use "
                    f"kernel_size * dilation <= {n} (a smaller kernel_size or dilation)"
                )
            clamped.append(k)
        kernels = tuple(clamped)

    def axis_window(qi, ki, n, k, d):
        """Key ``ki`` is among the ``k`` neighbours of query ``qi`` on an axis of length ``n``."""
        g = qi % d
        sub_len = (n - g + d - 1) // d  # length of the query's dilated sub-sequence
        start = torch.minimum((qi // d - k // 2).clamp(min=0), sub_len - k)
        kp = ki // d
        return ((ki % d) == g) & (kp >= start) & (kp < start + k)

    if grid is not None:
        (kh, kw), (dh, dw) = kernels, dils

        def neighborhood_2d(b, h, q_idx, kv_idx):
            rows = axis_window(q_idx // gw, kv_idx // gw, gh, kh, dh)
            return rows & axis_window(q_idx % gw, kv_idx % gw, gw, kw, dw)

        mod = neighborhood_2d
    elif causal:
        (k1,), (d1,) = kernels, dils

        def neighborhood_causal(b, h, q_idx, kv_idx):
            back = q_idx - kv_idx
            return (back >= 0) & (back <= (k1 - 1) * d1) & ((back % d1) == 0)

        mod = neighborhood_causal
    else:
        (k1,), (d1,) = kernels, dils
        n1 = axes[0][0]

        def neighborhood(b, h, q_idx, kv_idx):
            return axis_window(q_idx, kv_idx, n1, k1, d1)

        mod = neighborhood

    mod.kernel = kernels  # type: ignore[attr-defined]
    mod.dilation = dils  # type: ignore[attr-defined]
    mod.grid = None if grid is None else (gh, gw)  # type: ignore[attr-defined]
    mod.causal = bool(causal)  # type: ignore[attr-defined]
    mod.length = None if length is None else int(length)  # type: ignore[attr-defined]
    mod.cache_key = ("neighborhood", mod.kernel, mod.dilation, mod.grid, mod.causal, mod.length)  # type: ignore
    return mod


# ------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class NeighborhoodOptions(MethodOptions):
    """Options of ``neighborhood``.

    Attributes:
        kernel_size: neighbours per axis (an int, or ``(rows, cols)`` in 2-D).
        dilation: the dilation per axis (an int, or ``(rows, cols)`` in 2-D).
        grid: ``(H, W)`` for 2-D (tokens row-major, H·W = N), None for 1-D.
        block_q: query rows per gather block of ``gather`` (default: blocks of ~16 MiB).
    """

    kernel_size: Union[int, tuple] = 7
    dilation: Union[int, tuple] = 1
    grid: Optional[tuple] = None
    block_q: Optional[int] = None

    def validate(self) -> None:
        dims = 1 if self.grid is None else 2
        if self.grid is not None:
            _grid_of(self.grid)
        _as_pair("kernel_size", self.kernel_size, dims)
        _as_pair("dilation", self.dilation, dims)
        if self.block_q is not None and self.block_q < 1:
            raise AttentionInputError(f"option block_q must be a positive int (or None), got {self.block_q!r}")

    @classmethod
    def for_length(cls, n: int) -> dict:
        return {"kernel_size": min(7, max(2, n // 4) + 1)}


def _check_self(q, k, grid):
    """Self-attention only: Nq == Nk (and H·W == N on a grid)."""
    Nq, Nk = q.shape[2], k.shape[2]
    if Nq != Nk:
        raise AttentionInputError(
            f"neighborhood attention is self-attention: q and k must have the same length, got q {fmt_shape(q)} "
            f"and k {fmt_shape(k)} (its neighbours are positions of the query's own sequence)"
        )
    if grid is not None:
        cells = int(grid[0]) * int(grid[1])
        if cells != Nq:
            raise AttentionInputError(
                f"grid={tuple(grid)} has {cells} cells but q has Nq={Nq} tokens (q {fmt_shape(q)}); "
                "tokens must be the H·W grid cells in row-major order"
            )


def _pattern(q, k, call):
    o = call.options
    _check_self(q, k, o.grid)
    return neighborhood_mask(o.kernel_size, o.dilation, grid=o.grid, causal=call.causal, length=call.q_len)


@method("neighborhood", options=NeighborhoodOptions, paper="Neighborhood Attention Transformer",
        summary="each query attends to its k nearest neighbours (per axis, dilated, window shifted at borders)",
        patterns=("noncausal_self", "causal_self"), time="O(N k D) 1-D, O(N k² D) 2-D",
        memory="O(N k) 1-D, O(N k²) 2-D gather; O(N^2) reference", grid=True, mask_mods=(neighborhood_mask,))
def neighborhood(q, k, v, call):
    """Neighborhood attention as dense masked softmax (the definition).

    q: (B, Hq, N, D), k: (B, Hkv, N, D), v: (B, Hkv, N, Dv) -> (B, Hq, N, Dv).
    ``kernel_size``: neighbours per axis; ``dilation``: the dilation per axis;
    ``grid=(H, W)`` for 2-D (tokens row-major, H·W = N), None for 1-D.
    """
    return pattern_reference(q, k, v, call, _pattern(q, k, call))


# ---------------------------------------------------------------------------- gather


def _axis_neighbors(n: int, k: int, d: int, device) -> torch.Tensor:
    """``(n, k)``: the positions of the k neighbours of each position of an axis of
    length n with dilation d (the window shifted at the borders)."""
    i = torch.arange(n, device=device)
    g = i % d
    sub_len = (n - g + d - 1) // d
    start = torch.minimum((i // d - k // 2).clamp(min=0), sub_len - k)
    return g.unsqueeze(1) + d * (start.unsqueeze(1) + torch.arange(k, device=device))


def neighbor_index(mod, n: int, device):
    """``(idx, valid)``: ``idx (n, K)`` the token indices of each query's neighbours,
    ``valid (n, K)`` bool or None (all valid) — from the resolved parameters of a
    :func:`neighborhood_mask` function."""
    if mod.grid is not None:
        (gh, gw), (kh, kw), (dh, dw) = mod.grid, mod.kernel, mod.dilation
        rows = _axis_neighbors(gh, kh, dh, device)  # (H, kh)
        cols = _axis_neighbors(gw, kw, dw, device)  # (W, kw)
        idx = rows.view(gh, 1, kh, 1) * gw + cols.view(1, gw, 1, kw)
        return idx.reshape(n, kh * kw), None
    (k,), (d,) = mod.kernel, mod.dilation
    if mod.causal:
        i = torch.arange(n, device=device).unsqueeze(1)
        idx = i - d * (k - 1 - torch.arange(k, device=device))
        valid = idx >= 0
        return idx.clamp(min=0), (None if bool(valid.all()) else valid)
    return _axis_neighbors(n, k, d, device), None


def _rows_per_block(batch, kv_heads, q_heads, K, D, Dv):
    per_row = max(batch * kv_heads * K * max(D, Dv), batch * q_heads * K)
    return max(1, BLOCK_ELEMENTS // max(1, per_row))


def _block_allowed(valid, kpm, mask, idx, qs, qe, batch, q_heads, Hkv):
    """Bool ``(B', Hkv|1, G|1, rows, K)`` of the gathered pairs of query rows [qs, qe), or None."""
    out = None
    if valid is not None:
        out = valid[qs:qe].view(1, 1, qe - qs, -1)
    if kpm is not None:
        m = kpm[:, idx].view(batch, 1, qe - qs, -1)
        out = m if out is None else out & m
    if mask is not None:
        if isinstance(mask, torch.Tensor):
            m = mask if mask.shape[-2] == 1 else mask[..., qs:qe, :]
            if m.shape[-1] != 1:
                mb, mh = m.shape[0], m.shape[1]
                m = torch.gather(m.expand(mb, mh, qe - qs, m.shape[-1]), -1, idx.expand(mb, mh, qe - qs, idx.shape[-1]))
        else:  # a mask_mod, evaluated at the gathered pairs only
            b = torch.arange(batch, device=idx.device).view(-1, 1, 1, 1)
            h = torch.arange(q_heads, device=idx.device).view(1, -1, 1, 1)
            qi = torch.arange(qs, qe, device=idx.device).view(1, 1, -1, 1)
            m = mask(b, h, qi, idx.view(1, 1, qe - qs, -1))
            if not isinstance(m, torch.Tensor):
                m = torch.tensor(bool(m), device=idx.device)
            m = m.to(torch.bool)
            while m.dim() < 4:
                m = m.unsqueeze(0)
        out = m if out is None else out & m
    if out is None:
        return None
    if out.shape[1] == 1:
        return out.unsqueeze(2)
    return out.reshape(out.shape[0], Hkv, q_heads // Hkv, out.shape[2], out.shape[3])


def _softmax_rows(s, allowed):
    """Softmax over the neighbours (last dim); disallowed entries get 0, a row with
    nothing allowed gives zeros."""
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    p = torch.exp(s - m.masked_fill(torch.isinf(m), 0.0))
    return p / p.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(s.dtype).tiny)


class _GatherAttention(torch.autograd.Function):
    """Forward over blocks of query rows in the grouped layout ``(B, Hkv, G, N, D)``;
    saves the neighbour weights P ``(B, Hkv, G, N, K)`` and the output. The backward
    regathers K and V per block and ``index_add``-s the K/V gradients along the token dim."""

    @staticmethod
    def forward(ctx, q, k, v, idx, scale, allowed_fn, rows):
        B, Hq, N, D = q.shape
        Hkv, Dv = k.shape[1], v.shape[3]
        G = Hq // Hkv
        ct = compute_dtype(q.dtype)
        qg = q.view(B, Hkv, G, N, D)
        kc, vc = k.to(ct), v.to(ct)
        K = idx.shape[1]
        out = torch.empty(B, Hkv, G, N, Dv, dtype=ct, device=q.device)
        p_all = torch.empty(B, Hkv, G, N, K, dtype=ct, device=q.device)
        for qs in range(0, N, rows):
            qe = min(N, qs + rows)
            ib = idx[qs:qe]
            kg, vg = kc[:, :, ib], vc[:, :, ib]  # (B, Hkv, r, K, D)
            s = torch.einsum("bhgrd,bhrkd->bhgrk", qg[:, :, :, qs:qe].to(ct) * scale, kg)
            p = _softmax_rows(s, allowed_fn(qs, qe))
            p_all[:, :, :, qs:qe] = p
            out[:, :, :, qs:qe] = torch.einsum("bhgrk,bhrkd->bhgrd", p, vg)
        ctx.save_for_backward(q, k, v, idx, out, p_all)
        ctx.scale, ctx.rows = scale, rows
        return out.view(B, Hq, N, Dv).to(q.dtype, copy=True)  # a fresh tensor, not a view of the saved `out`

    @staticmethod
    def backward(ctx, dout):
        q, k, v, idx, out, p_all = ctx.saved_tensors
        scale, rows = ctx.scale, ctx.rows
        B, Hq, N, D = q.shape
        Hkv, Dv = k.shape[1], v.shape[3]
        G = Hq // Hkv
        K = idx.shape[1]
        ct = compute_dtype(q.dtype)
        qg = q.view(B, Hkv, G, N, D)
        dog = dout.reshape(B, Hkv, G, N, Dv).to(ct)
        kc, vc = k.to(ct), v.to(ct)
        dq = torch.empty(B, Hkv, G, N, D, dtype=ct, device=q.device)
        dk = torch.zeros(B, Hkv, N, D, dtype=ct, device=q.device)
        dv = torch.zeros(B, Hkv, N, Dv, dtype=ct, device=q.device)
        for qs in range(0, N, rows):
            qe = min(N, qs + rows)
            r = qe - qs
            ib = idx[qs:qe]
            flat = ib.reshape(-1)
            kg, vg = kc[:, :, ib], vc[:, :, ib]
            p = p_all[:, :, :, qs:qe]
            dob = dog[:, :, :, qs:qe]
            dv.index_add_(2, flat, torch.einsum("bhgrk,bhgrd->bhrkd", p, dob).reshape(B, Hkv, r * K, Dv))
            dp = torch.einsum("bhgrd,bhrkd->bhgrk", dob, vg)
            delta = (dob * out[:, :, :, qs:qe]).sum(dim=-1, keepdim=True)
            ds = p * (dp - delta) * scale
            dq[:, :, :, qs:qe] = torch.einsum("bhgrk,bhrkd->bhgrd", ds, kg)
            qb = qg[:, :, :, qs:qe].to(ct)
            dk.index_add_(2, flat, torch.einsum("bhgrk,bhgrd->bhrkd", ds, qb).reshape(B, Hkv, r * K, D))
        need = ctx.needs_input_grad
        return (dq.view(B, Hq, N, D).to(q.dtype) if need[0] else None,
                dk.to(k.dtype) if need[1] else None,
                dv.to(v.dtype) if need[2] else None,
                None, None, None, None)


def _gather_core(q, k, v, idx, valid, *, scale, mask=None, key_mask=None, block_q=None):
    """Attention of every query row ``i`` over the keys ``idx[i]`` (``valid[i]``)."""
    B, Hq, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    K = idx.shape[1]
    rows = max(1, int(block_q)) if block_q else _rows_per_block(B, Hkv, Hq, K, D, Dv)

    def allowed_fn(qs, qe):
        return _block_allowed(valid, key_mask, mask, idx[qs:qe], qs, qe, B, Hq, Hkv)

    return _GatherAttention.apply(q, k, v, idx, float(scale), allowed_fn, min(rows, N))


@neighborhood.impl("gather", options=("block_q",),
                   description="gather each query's k (k²) neighbours by index; analytic backward with index_add, "
                               "O(N·k) memory, never N×N")
def gather_attention(q, k, v, call):
    """Neighbourhood attention by gathering each query's k (k²) keys: never N×N.

    ``block_q``: query rows per gather block (default: blocks of at most ~16 MiB)."""
    idx, valid = neighbor_index(_pattern(q, k, call), call.q_len, q.device)
    return _gather_core(q, k, v, idx, valid, scale=call.scale, mask=call.mask, key_mask=call.key_mask,
                        block_q=call.options.block_q)


# ------------------------------------------------------------------------------ flex


@neighborhood.impl("flex", supports=flex_unsupported,
                   description="FlexAttention with the same mask_mod (CPU: inference only)")
def flex(q, k, v, call):
    """FlexAttention with the same mask_mod (inference on CPU)."""
    return pattern_flex(q, k, v, call, _pattern(q, k, call))


# -------------------------------------------------------------------------- decoding


class NeighborhoodCache:
    """Ring buffer of the last ``(kernel_size - 1)·dilation + 1`` keys and values: all a
    new token's causal neighbours, in constant memory. The token at position ``t`` lives
    in slot ``t % capacity``."""

    def __init__(self, batch_size, kv_heads, head_dim, v_dim, *, kernel_size, dilation, dtype, device):
        self.mod = neighborhood_mask(kernel_size, dilation, causal=True)
        (kk,), (d,) = self.mod.kernel, self.mod.dilation
        cap = (kk - 1) * d + 1
        self.k = torch.zeros(batch_size, kv_heads, cap, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch_size, kv_heads, cap, v_dim, dtype=dtype, device=device)
        self.length = 0  # tokens seen so far

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def check(self, k, v):
        if k.dtype != self.k.dtype:
            raise AttentionInputError(f"k has dtype {k.dtype} but the cache was made for {self.k.dtype}")
        if k.shape[:2] != self.k.shape[:2] or k.shape[3] != self.k.shape[3] or v.shape[3] != self.v.shape[3]:
            raise AttentionInputError(
                f"new k {fmt_shape(k)} / v {fmt_shape(v)} do not match the cache "
                f"(B, Hkv, *, D) = {fmt_shape(self.k.shape[:2] + (-1, self.k.shape[3]))}, Dv = {self.v.shape[3]}"
            )


def _no_grid(grid):
    if grid is not None:
        raise AttentionInputError(f"neighborhood attention on a 2-D grid (grid={grid!r}) has no causal form to decode")


@neighborhood.decodes
class NeighborhoodDecoder(Decoder):
    """1-D causal decoding over a :class:`NeighborhoodCache` (constant memory)."""

    state_size = "ring buffer of the last (kernel_size-1)·dilation+1 keys/values: 2·Hkv·((k-1)·d+1)·D per sequence"

    def init_state(self, batch_size, kv_heads, head_dim, v_dim, *, dtype, device, max_len, options):
        _no_grid(options.grid)
        return NeighborhoodCache(batch_size, kv_heads, head_dim, v_dim, kernel_size=options.kernel_size,
                                 dilation=options.dilation, dtype=dtype, device=device)

    def step(self, run, cache, q, k, v, *, scale, impl, options):
        """The new tokens attend to their causal neighbours among the cached ones and
        themselves; then the ring buffer keeps the last ``capacity`` tokens."""
        _no_grid(options.grid)
        cache.check(k, v)
        (kk,), (d,) = cache.mod.kernel, cache.mod.dilation
        given = neighborhood_mask(options.kernel_size, options.dilation, causal=True)
        if (given.kernel, given.dilation) != (cache.mod.kernel, cache.mod.dilation):
            raise AttentionInputError(
                f"step got kernel_size={options.kernel_size}, dilation={options.dilation} but the cache was made for "
                f"kernel_size={kk}, dilation={d}"
            )
        T, C, L = q.shape[2], cache.capacity, cache.length
        dev = q.device
        # Keys: the ring's C slots, then the T new tokens. Position j < L is in slot j % C,
        # position j >= L at C + (j - L).
        keys = torch.cat([cache.k, k], dim=2)
        values = torch.cat([cache.v, v], dim=2)
        pos = L + torch.arange(T, device=dev).unsqueeze(1) - d * (kk - 1 - torch.arange(kk, device=dev))  # (T, K)
        valid = pos >= 0
        idx = torch.where(pos >= L, C + pos - L, pos.clamp(min=0) % C)
        # The query rows of the grouped core are the T new tokens over the C + T keys.
        out = _gather_rows(q, keys, values, idx, None if bool(valid.all()) else valid, scale=scale)
        keep = min(T, C)
        slots = (L + T - keep + torch.arange(keep, device=dev)) % C
        cache.k[:, :, slots] = k[:, :, T - keep:]
        cache.v[:, :, slots] = v[:, :, T - keep:]
        cache.length = L + T
        return out


def _gather_rows(q, keys, values, idx, valid, *, scale):
    """Attention of the T new query rows over the gathered cache slots ``idx (T, K)``
    (plain indexing: decoding touches only O(T·K) keys)."""
    B, Hq, T, D = q.shape
    Hkv, Dv = keys.shape[1], values.shape[3]
    G = Hq // Hkv
    ct = compute_dtype(q.dtype)
    kg, vg = keys.to(ct)[:, :, idx], values.to(ct)[:, :, idx]  # (B, Hkv, T, K, D)
    s = torch.einsum("bhgrd,bhrkd->bhgrk", q.to(ct).view(B, Hkv, G, T, D) * scale, kg)
    p = _softmax_rows(s, None if valid is None else valid.view(1, 1, 1, T, -1))
    return torch.einsum("bhgrk,bhrkd->bhgrd", p, vg).reshape(B, Hq, T, Dv).to(q.dtype)

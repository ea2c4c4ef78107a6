"""Gated positional self-attention (ConViT's GPSA): a learned gate mixes content and positional attention.

    tokens on an H × W grid (row-major, ``grid=(H, W)``); r_ij = (Δrow, Δcol, Δrow² + Δcol²),
    Δ = position of key j − position of query i
    A_h = (1 − σ(λ_h)) · softmax_j(scale · q_i·k_j) + σ(λ_h) · softmax_j(v_posᵀ_h r_ij)
    O_h = A_h V

"ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases"
(d'Ascoli et al., ICML 2021). Each head mixes content attention with a purely
positional attention through a learnable gate ``λ_h``; the positional part is
initialised to mimic a convolution — head h attends around its own offset
``Δ_h`` with locality strength ``α``: ``v_pos,h = α · (2Δ_h, −1)``, so
``v_posᵀ r_ij = −α‖δ_ij − Δ_h‖² + const`` — and the gate at ``λ = 1``
(``σ(1) ≈ 0.73`` positional), so the heads start local and "escape locality by
adjusting a gating parameter".

Judgement calls:

* [J] The functional form's defaults are ConViT's initialisation: ``pos_weight=None``
  is the local init (the heads' offsets ``Δ_h`` on a ``⌈√H⌉ × ⌈√H⌉`` grid centred on
  the query, head ``h`` at ``(h mod s, h div s) − (s−1)/2``, as ConViT's loop over
  ``h1 + s·h2``; ConViT takes ``s = ⌊√H⌋`` and leaves the heads beyond ``s²`` at random,
  here they continue the ⌈√H⌉ grid), ``gate=None`` is ``λ = 1``.
  :class:`GatedPositionalAttention` learns both.
* [J] ``r_ij`` is ordered (Δrow, Δcol, squared distance); ConViT's ``pos_proj`` bias is
  a constant per head that the softmax removes, so there is none. ConViT divides A by
  its row sum afterwards; with both softmaxes normalised that sum is 1 (0 for a row
  with nothing to see), so it is left out.
* [J] Masks and key padding restrict both softmaxes (a row with nothing allowed gives
  zeros). GQA: the positional part does not read k; V is the query head's k/v head's.
* [J] ``grid=None`` is a 1-D sequence (the ``1 × N`` grid, Δrow = 0), ``"auto"`` the
  most square grid.
* [J] Self-attention on the grid only (``r_ij`` needs queries and keys on one grid),
  noncausal (ConViT attends over the whole image).

Complexity: time O(N²·D) (the content softmax is dense); the positional part costs
O(N·(H + W)·Dv) in ``separable`` — ``exp(a(Δrow) + b(Δcol))`` factorises, so its
softmax is a row softmax times a column softmax, applied along each axis — and the
content part is SDPA's; memory O(N·Dv) there. ``sdpa`` and the reference build the
N × N positional scores.

Implementations:

* ``reference`` — both softmaxes as explicit N × N matrices, mixed, times V;
* ``separable`` — content by ``scaled_dot_product_attention``; positional as an
  H × H and a W × W softmax applied along the grid's axes (no N × N); no masks or
  key padding (they break the factorisation: use ``sdpa``);
* ``sdpa`` — both parts by ``scaled_dot_product_attention`` (the positional scores as a
  float mask with zero queries), masks and key padding included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F

from ...errors import AttentionInputError, fmt_shape
from ...kernels.common import compute_dtype, repeat_kv
from ...kernels.dense import masked_softmax, scores
from ...kernels.grid_pool import check_grid_option, resolve_grid
from ...kernels.sdpa import sdpa_attention
from ...registry import MethodOptions, method

NAME = "gated_positional"


def local_init(heads: int, locality_strength: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    """ConViT's local initialisation of ``v_pos``: ``(heads, 3)`` acting on
    ``(Δrow, Δcol, Δrow² + Δcol²)``; head ``h`` peaks at the offset
    ``(h mod s − c, h div s − c)``, ``s = ⌈√heads⌉``, ``c = (s − 1)/2``, with strength α."""
    s = max(1, math.ceil(math.sqrt(heads)))
    c = (s - 1) / 2
    w = torch.zeros(heads, 3, dtype=dtype)
    for h in range(heads):
        w[h, 0] = 2 * (h % s - c)
        w[h, 1] = 2 * (h // s - c)
        w[h, 2] = -1.0
    return w * float(locality_strength)


@dataclass(frozen=True)
class GatedPositionalOptions(MethodOptions):
    """Options of ``gated_positional``.

    Attributes:
        grid: ``(H, W)`` (row-major, ``H·W = N``), ``"auto"`` (the most square
            factorisation of N) or None (a 1-D sequence, the 1 × N grid).
        pos_weight: ``(Hq, 3)``: ``v_pos`` of every head, on ``(Δrow, Δcol, Δrow² + Δcol²)``;
            None: ConViT's local initialisation with ``locality_strength``.
        gate: ``(Hq,)``: the gating logits λ (σ(λ) is the positional share); None: 1.
        locality_strength: α of the local initialisation (ConViT: 1).
    """

    grid: Optional[Union[tuple, Literal["auto"]]] = None
    pos_weight: Optional[torch.Tensor] = None
    gate: Optional[torch.Tensor] = None
    locality_strength: float = 1.0

    def validate(self) -> None:
        check_grid_option(NAME, self.grid)

    @classmethod
    def for_length(cls, n: int) -> dict:
        """The most square grid of the tokens."""
        return {"grid": "auto"}


def _setup(q, k, call):
    """``(grid, pos_weight (Hq, 3), sigma (Hq,))`` in the compute dtype, checked."""
    if q.shape[2] != k.shape[2]:
        raise AttentionInputError(
            f"{NAME} is self-attention on the grid: q and k must have the same length, got q {fmt_shape(q)} and "
            f"k {fmt_shape(k)} (its positional scores compare positions of one grid)")
    o = call.options
    ct = compute_dtype(q.dtype)
    Hq = q.shape[1]
    grid = resolve_grid(NAME, o.grid, q.shape[2], "q")
    w = local_init(Hq, o.locality_strength, ct) if o.pos_weight is None else o.pos_weight
    if tuple(w.shape) != (Hq, 3):
        raise AttentionInputError(f"{NAME}: pos_weight must have shape (Hq, 3) = ({Hq}, 3), got {fmt_shape(w)}")
    lam = torch.ones(Hq, dtype=ct) if o.gate is None else o.gate
    if tuple(lam.shape) != (Hq,):
        raise AttentionInputError(f"{NAME}: gate must have shape (Hq,) = ({Hq},), got {fmt_shape(lam)}")
    return grid, w.to(device=q.device, dtype=ct), torch.sigmoid(lam.to(device=q.device, dtype=ct))


def positional_scores(grid: tuple, pos_weight: torch.Tensor) -> torch.Tensor:
    """``(Hq, N, N)``: ``v_posᵀ r_ij`` for every head and pair of grid cells."""
    H, W = grid
    i = torch.arange(H * W, device=pos_weight.device)
    rows, cols = (i // W).to(pos_weight.dtype), (i % W).to(pos_weight.dtype)
    dr = rows.view(1, -1) - rows.view(-1, 1)  # [i, j] = row(j) - row(i)
    dc = cols.view(1, -1) - cols.view(-1, 1)
    r = torch.stack([dr, dc, dr * dr + dc * dc], dim=-1)  # (N, N, 3)
    return torch.einsum("ijc,hc->hij", r, pos_weight)


# ------------------------------------------------------------------------ reference


@method(NAME, short_impl="separable", options=GatedPositionalOptions,
        paper="ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases",
        summary="per head, a learned gate mixes content softmax and positional softmax (initialised local)",
        patterns=("noncausal_self",), time="O(N² D)", memory="O(N Dv) separable; O(N^2) sdpa, reference", grid=True)
def gated_positional(q, k, v, call):
    """GPSA with both attention maps as explicit N × N matrices (the definition).

    q: (B, Hq, N, D), k: (B, Hkv, N, D), v: (B, Hkv, N, Dv) -> (B, Hq, N, Dv); weights: A.
    """
    grid, w, sigma = _setup(q, k, call)
    ct = compute_dtype(q.dtype)
    Hq = q.shape[1]
    allowed = call.masker.full()
    content = masked_softmax(scores(q, k, call.scale), allowed)
    positional = masked_softmax(positional_scores(grid, w).unsqueeze(0), allowed)
    g = sigma.view(1, Hq, 1, 1)
    A = (1 - g) * content + g * positional
    out = (A @ repeat_kv(v, Hq).to(ct)).to(q.dtype)
    return (out, A.to(q.dtype)) if call.return_weights else out


# ---------------------------------------------------------------------------- fast


def _axis_softmax(n: int, lin: torch.Tensor, quad: torch.Tensor) -> torch.Tensor:
    """``(Hq, n, n)``: ``softmax_j(lin·(j - i) + quad·(j - i)²)`` per head on one axis."""
    d = torch.arange(n, device=lin.device, dtype=lin.dtype)
    d = d.view(1, -1) - d.view(-1, 1)
    return torch.softmax(lin.view(-1, 1, 1) * d + quad.view(-1, 1, 1) * d * d, dim=-1)


def _separable_supports(call) -> Optional[str]:
    if call.mask is not None or call.key_mask is not None:
        return "masks and key padding break the positional softmax's factorisation over the axes; use impl='sdpa'"
    if call.score_mod is not None:
        return "it takes no score_mod"
    return None


@gated_positional.impl("separable", supports=_separable_supports,
                       description="content by SDPA; positional softmax = row softmax × column softmax applied along "
                                   "the grid's axes: O(N·(H+W)·Dv), no N×N (no masks)")
def separable(q, k, v, call):
    """Content attention by SDPA; the positional attention factorised over the grid's axes:
    ``exp(w_r Δr + w_c Δc + w_d (Δr² + Δc²))`` is a row factor times a column factor, so its
    softmax is the H × H row softmax times the W × W column softmax."""
    grid, w, sigma = _setup(q, k, call)
    ct = compute_dtype(q.dtype)
    B, Hq, N, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    G = Hq // Hkv
    H, W = grid
    content = F.scaled_dot_product_attention(q.to(ct), k.to(ct), v.to(ct), scale=call.scale, enable_gqa=Hq != Hkv)
    R = _axis_softmax(H, w[:, 0], w[:, 2]).view(Hkv, G, H, H)
    C = _axis_softmax(W, w[:, 1], w[:, 2]).view(Hkv, G, W, W)
    vg = v.to(ct).view(B, Hkv, H, W, Dv)
    along_cols = torch.einsum("hgcw,bhrwd->bhgrcd", C, vg)  # (B, Hkv, G, H, W, Dv)
    positional = torch.einsum("hgar,bhgrcd->bhgacd", R, along_cols).reshape(B, Hq, N, Dv)
    g = sigma.view(1, Hq, 1, 1)
    return ((1 - g) * content + g * positional).to(q.dtype)


@gated_positional.impl("sdpa", description="both parts by SDPA (positional scores as a float mask, zero queries); "
                                           "masks and key padding; O(N²) memory for the positional scores")
def sdpa(q, k, v, call):
    """Content and positional attention, each by ``scaled_dot_product_attention``."""
    grid, w, sigma = _setup(q, k, call)
    ct = compute_dtype(q.dtype)
    B, Hq, N, _ = q.shape
    Hkv = k.shape[1]
    vc = v.to(ct)
    content = sdpa_attention(q.to(ct), k.to(ct), vc, scale=call.scale, mask=call.mask, key_mask=call.key_mask)
    bias = positional_scores(grid, w).unsqueeze(0)  # (1, Hq, N, N)
    allowed = call.masker.full()
    if allowed is not None:
        bias = bias.masked_fill(~allowed, float("-inf"))
    zeros_q = vc.new_zeros(B, Hq, N, 1)
    positional = F.scaled_dot_product_attention(zeros_q, vc.new_zeros(B, Hkv, N, 1), vc, attn_mask=bias,
                                                enable_gqa=Hq != Hkv)
    if allowed is not None:
        empty = ~allowed.any(-1, keepdim=True)
        if bool(empty.any()):
            positional = positional.masked_fill(empty, 0.0)
    g = sigma.view(1, Hq, 1, 1)
    return ((1 - g) * content + g * positional).to(q.dtype)


# --------------------------------------------------------------------------- module


@gated_positional.module_class
class GatedPositionalAttention(torch.nn.Module):
    """GPSA with learnable ``v_pos`` (initialised local) and gates (λ = 1); call it like the
    functional form: ``module(q, k, v, key_mask=...)``.

    Args:
        heads, kv_heads: query and key/value heads (``kv_heads`` defaults to ``heads``).
        head_dim: D. ``v_dim``: Dv (default D).
        grid: ``(H, W)``, ``"auto"`` or None (1-D). ``locality_strength``: α of the init.
    """

    def __init__(self, heads: int, head_dim: int, kv_heads: Optional[int] = None, v_dim: Optional[int] = None,
                 impl: str = "auto", grid=None, locality_strength: float = 1.0):
        super().__init__()
        GatedPositionalOptions(grid=grid)  # fail now, not at the first forward
        self.heads, self.kv_heads, self.impl, self.grid = heads, kv_heads or heads, impl, grid
        self.pos_weight = torch.nn.Parameter(local_init(heads, locality_strength))
        self.gate = torch.nn.Parameter(torch.ones(heads))

    def forward(self, q, k, v, **kwargs):
        kwargs.setdefault("impl", self.impl)
        kwargs.setdefault("grid", self.grid)
        return gated_positional(q, k, v, pos_weight=self.pos_weight, gate=self.gate, **kwargs)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, kv_heads={self.kv_heads}, grid={self.grid}"

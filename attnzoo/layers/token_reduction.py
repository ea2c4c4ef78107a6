"""Token reduction between transformer blocks: EViT's top-k by [CLS] attention with the
rest fused, and ToMe's bipartite token merging — as functions on token sequences, and
the modules that put them between blocks.

* :func:`evit_reduce` — "Not All Patches are What You Need: Expediting Vision
  Transformers via Token Reorganizations" (Liang et al., ICLR 2022). Between a block's
  attention and its MLP, keep the ``k`` image tokens the [CLS] token attends to most
  (its attention averaged over the heads) and fuse the inattentive ones into one token,
  ``x_fused = Σ_{i inattentive} a_i x_i`` (the paper's attention-weighted sum):
  ``[CLS], kept tokens, fused token``. O(N log N) per sequence.
* :func:`tome_merge` — "Token Merging: Your ViT But Faster" (Bolya et al., ICLR 2023).
  Bipartite soft matching: the tokens alternate into sets A (even positions) and B
  (odd); each A token finds its most similar B token (cosine similarity of a metric,
  the keys averaged over the heads in ToMe); the ``r`` A tokens with the most similar
  matches merge into them, a merged token being the **size-weighted mean** of what it
  absorbs (``(s_b x_b + Σ s_a x_a) / (s_b + Σ s_a)``), its size the sum. ``r`` tokens
  fewer per call; O(N²·C / 4) for the similarities (N/2 × N/2), like one attention.
* :class:`TokenReduction` — what both return: the reduced tokens, the **index map**
  (``index[b, t]`` = the reduced token that original token ``t`` went to, ``-1`` if
  dropped) and the sizes (original tokens per reduced token); :func:`restore` maps
  reduced tokens back onto the original positions (``x_red[index]``, dense prediction),
  :func:`compose_index` chains the maps of successive reductions.
* Glue: :class:`EViTReduction` (a module ``(x, cls_attention) -> TokenReduction``),
  :class:`ToMeMerge` (``(x, metric, size) -> TokenReduction``), and
  :class:`ReducingBlock`, a pre-norm transformer block over an
  :class:`~attnzoo.layers.attention.Attention` of any method that reduces its tokens
  between the attention and the MLP (where both papers do), its scores read from the
  block's own projections, with ToMe's proportional attention (``+ log s`` on the
  scores) for methods that take a float mask.

Judgement calls:

* [J] EViT keeps the kept tokens in their original order (its code keeps them in
  descending attention order; with the positions already embedded, the order is
  free), and the [CLS] token is token 0. The fused token follows the paper's sum
  (not renormalised: its scale carries how much attention the inattentive tokens had);
  with nothing to fuse there is no fused token.
* [J] ToMe: the unmerged A tokens keep their original order, then the B tokens (ToMe's
  ``cat([unm, dst])``); with ``cls_token=True`` token 0 (in A) is never merged; ties in
  the similarity ranking go to the lower index (a stable sort). ``r`` is clamped to
  the number of A tokens that may merge.
* [J] :class:`ReducingBlock` computes EViT's [CLS] attention as the softmax row of the
  [CLS] query over the keys of the block's own projections (rotary and QK-norm
  included), whatever method the block attends with — exact for softmax, the
  natural score for the others; ToMe's metric is the keys averaged over the heads.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import nn

from .. import registry
from ..errors import AttentionInputError, fmt_shape
from .attention import Attention

__all__ = [
    "EViTReduction",
    "ReducingBlock",
    "ToMeMerge",
    "TokenReduction",
    "compose_index",
    "evit_reduce",
    "restore",
    "tome_merge",
]


class TokenReduction(NamedTuple):
    """A reduced token sequence.

    ``x (B, M, C)``: the reduced tokens; ``index (B, N)`` long: the reduced token that
    each original token went to (``-1``: dropped); ``size (B, M)``: how many original
    tokens (summed sizes) each reduced token stands for.
    """

    x: torch.Tensor
    index: torch.Tensor
    size: torch.Tensor


def _check_x(x, name="x"):
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
        shape = fmt_shape(x) if isinstance(x, torch.Tensor) else type(x).__name__
        raise AttentionInputError(f"{name} must be a float tensor of shape (B, N, C), got {shape}")


def _sizes(size, x):
    B, N = x.shape[:2]
    if size is None:
        return torch.ones(B, N, dtype=x.dtype, device=x.device)
    if tuple(size.shape) != (B, N):
        raise AttentionInputError(f"size must have shape (B, N) = {fmt_shape((B, N))}, got {fmt_shape(size)}")
    return size.to(x.dtype)


# ------------------------------------------------------------------------------ EViT


def evit_reduce(x: torch.Tensor, cls_attention: torch.Tensor, keep: int, *, fuse: bool = True,
                size: Optional[torch.Tensor] = None) -> TokenReduction:
    """EViT's token reorganisation.

    Args:
        x: ``(B, N, C)``, token 0 the [CLS] token.
        cls_attention: ``(B, N)`` or ``(B, H, N)`` — the [CLS] query's attention to the N
            tokens (a row of the attention weights, ``weights[:, :, 0]``), averaged over
            the heads when given per head; its [CLS] entry is ignored.
        keep: image tokens to keep (``0 <= keep <= N - 1``; EViT: ``ceil(κ (N - 1))``).
        fuse: fuse the other image tokens into one token ``Σ a_i x_i`` (EViT); False
            drops them (index -1).
        size: ``(B, N)`` sizes of the tokens (default ones); the fused token's is the sum.

    Returns: :class:`TokenReduction` with ``x = [CLS, the kept tokens in their order,
    the fused token]`` (``1 + keep + 1`` tokens; no fused token when there is nothing
    to fuse or ``fuse=False``).
    """
    _check_x(x)
    B, N, C = x.shape
    a = cls_attention
    if not isinstance(a, torch.Tensor) or a.dim() not in (2, 3) or a.shape[0] != B or a.shape[-1] != N:
        shape = fmt_shape(a) if isinstance(a, torch.Tensor) else type(a).__name__
        raise AttentionInputError(f"cls_attention must have shape (B, N) = {fmt_shape((B, N))} or (B, H, N), got {shape}")
    if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= N - 1:
        raise AttentionInputError(f"keep must be an int in [0, N - 1] = [0, {N - 1}] (image tokens to keep), got {keep!r}")
    if a.dim() == 3:
        a = a.mean(1)
    a = a[:, 1:].to(x.dtype)  # attention to the image tokens
    s = _sizes(size, x)
    order = torch.sort(a, dim=1, descending=True, stable=True).indices  # ties: the lower index first
    kept = order[:, :keep].sort(dim=1).values + 1  # token indices, original order
    rest = order[:, keep:] + 1
    cls = x[:, :1]
    parts = [cls, x.gather(1, kept.unsqueeze(-1).expand(B, keep, C))]
    sizes = [s[:, :1], s.gather(1, kept)]
    index = torch.full((B, N), -1, dtype=torch.long, device=x.device)
    index[:, 0] = 0
    index.scatter_(1, kept, torch.arange(1, keep + 1, device=x.device).expand(B, keep))
    if fuse and rest.shape[1]:
        w = a.gather(1, rest - 1)  # the inattentive tokens' attention
        xr = x.gather(1, rest.unsqueeze(-1).expand(B, rest.shape[1], C))
        parts.append((w.unsqueeze(-1) * xr).sum(1, keepdim=True))
        sizes.append(s.gather(1, rest).sum(1, keepdim=True))
        index.scatter_(1, rest, keep + 1)
    return TokenReduction(torch.cat(parts, 1), index, torch.cat(sizes, 1))


# ------------------------------------------------------------------------------ ToMe


def tome_merge(x: torch.Tensor, r: int, *, metric: Optional[torch.Tensor] = None, size: Optional[torch.Tensor] = None,
               cls_token: bool = True) -> TokenReduction:
    """ToMe's bipartite soft matching: ``r`` tokens fewer.

    Args:
        x: ``(B, N, C)``.
        r: tokens to remove (merged away); clamped to the A tokens that may merge.
        metric: ``(B, N, Cm)`` the similarity features (ToMe: the keys averaged over the
            heads); default ``x``. Cosine similarity.
        size: ``(B, N)`` token sizes (default ones): merged tokens are size-weighted means.
        cls_token: token 0 is [CLS] and is never merged.

    Returns: :class:`TokenReduction` with ``x = [the unmerged A tokens (even positions)
    in order, the B tokens (odd positions) in order]``, ``N - r`` tokens.
    """
    _check_x(x)
    B, N, C = x.shape
    m = x if metric is None else metric
    if not isinstance(m, torch.Tensor) or m.dim() != 3 or tuple(m.shape[:2]) != (B, N):
        shape = fmt_shape(m) if isinstance(m, torch.Tensor) else type(m).__name__
        raise AttentionInputError(f"metric must have shape (B, N, Cm) with (B, N) = {fmt_shape((B, N))}, got {shape}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise AttentionInputError(f"r must be a non-negative int (tokens to merge away), got {r!r}")
    s = _sizes(size, x)
    a_idx = torch.arange(0, N, 2, device=x.device)
    b_idx = torch.arange(1, N, 2, device=x.device)
    Na, Nb = a_idx.numel(), b_idx.numel()
    r = min(r, Na - (1 if cls_token else 0)) if Nb else 0
    r = max(r, 0)
    if r == 0:
        return TokenReduction(x, torch.arange(N, device=x.device).expand(B, N).clone(), s)
    with torch.no_grad():  # the matching is a discrete choice; gradients flow through the merge
        mn = m / m.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        scores = mn[:, a_idx] @ mn[:, b_idx].transpose(1, 2)  # (B, Na, Nb)
        if cls_token:
            scores[:, 0] = float("-inf")
        best, match = scores.max(dim=-1)  # each A token's most similar B token
        ranked = torch.sort(best, dim=1, descending=True, stable=True).indices
        src = ranked[:, :r]  # the A tokens that merge (positions in A)
        unm = ranked[:, r:].sort(dim=1).values  # those that stay, in order
        dst = match.gather(1, src)  # their B tokens (positions in B)
    xa, xb = x[:, a_idx], x[:, b_idx]
    sa, sb = s[:, a_idx], s[:, b_idx]
    Nu = Na - r
    # size-weighted means: sum x·s and s into the B tokens, then divide
    num = (xb * sb.unsqueeze(-1)).scatter_add(1, dst.unsqueeze(-1).expand(B, r, C),
                                              (xa * sa.unsqueeze(-1)).gather(1, src.unsqueeze(-1).expand(B, r, C)))
    den = sb.scatter_add(1, dst, sa.gather(1, src))
    merged = num / den.unsqueeze(-1)
    out = torch.cat([xa.gather(1, unm.unsqueeze(-1).expand(B, Nu, C)), merged], 1)
    index = torch.empty(B, N, dtype=torch.long, device=x.device)
    index[:, b_idx] = Nu + torch.arange(Nb, device=x.device)
    a_target = torch.empty(B, Na, dtype=torch.long, device=x.device)
    a_target.scatter_(1, unm, torch.arange(Nu, device=x.device).expand(B, Nu))
    a_target.scatter_(1, src, Nu + dst)
    index[:, a_idx] = a_target
    return TokenReduction(out, index, torch.cat([sa.gather(1, unm), den], 1))


# ---------------------------------------------------------------------------- maps


def restore(x_reduced: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The reduced tokens ``(B, M, C)`` spread back over the original positions
    ``(B, N, C)``: ``out[b, t] = x_reduced[b, index[b, t]]`` (zeros where ``index`` is -1)."""
    B, N = index.shape
    C = x_reduced.shape[-1]
    out = x_reduced.gather(1, index.clamp(min=0).unsqueeze(-1).expand(B, N, C))
    return out.masked_fill((index < 0).unsqueeze(-1), 0.0)


def compose_index(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The index map of two reductions in a row: original token -> token after both
    (-1 stays -1)."""
    out = second.gather(1, first.clamp(min=0))
    return out.masked_fill(first < 0, -1)


# ---------------------------------------------------------------------------- modules


class EViTReduction(nn.Module):
    """EViT's reorganisation as a module: ``forward(x, cls_attention, size=None)`` ->
    :class:`TokenReduction` keeping ``ceil(keep_rate · (N - 1))`` image tokens.

    Args:
        keep_rate: κ in (0, 1] (EViT uses 0.5–0.9 at three layers).
        fuse: fuse the inattentive tokens into one (EViT) or drop them.
    """

    def __init__(self, keep_rate: float = 0.7, fuse: bool = True):
        super().__init__()
        if not 0.0 < float(keep_rate) <= 1.0:
            raise AttentionInputError(f"keep_rate must be in (0, 1], got {keep_rate!r}")
        self.keep_rate, self.fuse = float(keep_rate), bool(fuse)

    def kept(self, n: int) -> int:
        """Image tokens kept out of ``n`` tokens ([CLS] included)."""
        return min(n - 1, math.ceil(self.keep_rate * (n - 1)))

    def forward(self, x, cls_attention, size=None) -> TokenReduction:
        return evit_reduce(x, cls_attention, self.kept(x.shape[1]), fuse=self.fuse, size=size)

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, fuse={self.fuse}"


class ToMeMerge(nn.Module):
    """ToMe's bipartite merging as a module: ``forward(x, metric=None, size=None)`` ->
    :class:`TokenReduction` with ``r`` tokens fewer.

    Args:
        r: tokens merged away per call. ``cls_token``: token 0 is never merged.
    """

    def __init__(self, r: int = 8, cls_token: bool = True):
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise AttentionInputError(f"r must be a non-negative int, got {r!r}")
        self.r, self.cls_token = r, bool(cls_token)

    def forward(self, x, metric=None, size=None) -> TokenReduction:
        return tome_merge(x, self.r, metric=metric, size=size, cls_token=self.cls_token)

    def extra_repr(self) -> str:
        return f"r={self.r}, cls_token={self.cls_token}"


class ReducingBlock(nn.Module):
    """A pre-norm transformer block that reduces its tokens between attention and MLP::

        x = x + Attention(LN(x))          (ToMe: + log(size) on the scores, proportional attention)
        x, index, size = reduction(x, ...)   EViT: the [CLS] attention; ToMe: the keys averaged over heads
        x = x + MLP(LN(x))

    ``forward(x, size=None) -> TokenReduction`` (the index map of this block's reduction;
    chain blocks' maps with :func:`compose_index`). Without a reduction it is a plain block.

    Args:
        dim, heads: width and heads of the :class:`Attention` (any ``method`` and its
            options, ``**attention_options``, e.g. ``rotary=True``).
        reduction: an :class:`EViTReduction`, a :class:`ToMeMerge` or None.
        mlp_ratio: hidden width of the MLP over ``dim``.
        proportional: ToMe's proportional attention (needs a method that takes a float
            mask, ``score_mods=True``; default: when it does).
    """

    def __init__(self, dim: int, heads: int = 4, *, reduction: Optional[nn.Module] = None, mlp_ratio: float = 4.0,
                 method: str = "softmax", proportional: Optional[bool] = None, **attention_options):
        super().__init__()
        if reduction is not None and not isinstance(reduction, (EViTReduction, ToMeMerge)):
            raise AttentionInputError(f"reduction must be an EViTReduction, a ToMeMerge or None, got "
                                      f"{type(reduction).__name__}")
        spec = registry.get(method)
        if proportional is None:
            proportional = isinstance(reduction, ToMeMerge) and spec.score_mods
        if proportional and not spec.score_mods:
            raise AttentionInputError(f"proportional attention adds log(size) to the scores, and method {method!r} "
                                      "takes no float mask (score_mods=False); pass proportional=False")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, method=method, **attention_options)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.reduction, self.proportional = reduction, bool(proportional)

    def _scores(self, h: torch.Tensor) -> torch.Tensor:
        """What the reduction reads, from the attention's own projections of ``h``."""
        positions = torch.arange(h.shape[1], device=h.device)
        k, _ = self.attn._keys_values(h, positions)  # (B, Hkv, N, Dh)
        if isinstance(self.reduction, ToMeMerge):
            return k.mean(1)  # ToMe's metric: the keys averaged over the heads
        q = self.attn._queries(h[:, :1], positions[:1])  # the [CLS] query (B, H, 1, Dh)
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)
        a = torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
        return a.squeeze(2).mean(1)  # (B, N): the [CLS] attention averaged over the heads

    def forward(self, x: torch.Tensor, size: Optional[torch.Tensor] = None) -> TokenReduction:
        _check_x(x)
        B, N, _ = x.shape
        s = _sizes(size, x)
        h = self.norm1(x)
        bias = torch.log(s).view(B, 1, 1, N) if self.proportional else None
        x = x + self.attn(h, attn_mask=bias)
        if self.reduction is None:
            red = TokenReduction(x, torch.arange(N, device=x.device).expand(B, N).clone(), s)
        else:
            # EViT's fused token is weighted by the [CLS] attention, which gets gradients; the
            # choice of tokens (EViT's top-k, ToMe's matching) is discrete and gets none
            red = self.reduction(x, self._scores(h), s)
        y = red.x + self.mlp(self.norm2(red.x))
        return TokenReduction(y, red.index, red.size)

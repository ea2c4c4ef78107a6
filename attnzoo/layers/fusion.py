"""Cross-modal fusion layers over any registered method.

Every attention inside is an :class:`~attnzoo.layers.attention.Attention` with the layer's
``method`` (and ``**method_options``), so a fusion layer runs with softmax, a linear
method, a window, HyperAttention, ...; the method must have a noncausal cross form
(checked at construction). Tokens are ``(B, N, dim)``; padding masks are ``(B, N)`` bool,
True = padding (as in ``nn.MultiheadAttention``).

* :class:`CrossViTFusion` — CLS-as-query cross-attention ("CrossViT: Cross-Attention
  Multi-Scale Vision Transformer for Image Classification"): each branch's CLS token,
  projected to the other branch's width, is the *only* query over ``[its CLS | the other
  branch's patch tokens]``; the result is projected back and replaces the CLS. One query:
  time and memory linear in the number of tokens.
* :class:`LatentCrossAttention` — Perceiver-style latents ("Perceiver: General Perception
  with Iterative Attention"): ``L`` learnt latents cross-attend the inputs (O(L·N)), then
  self-attend (O(L²)); call it again with its output as ``latents`` to iterate with shared
  weights.
* :class:`FITBlock` — FIT's interleaved local and global latent attention ("FIT:
  Far-reaching Interleaved Transformers"): tokens in groups of ``g`` attend within their
  group (local), each group's latents read their group, all latents attend one another
  (global), each group's tokens read back their latents. O(N·g + (N/g·L)²).
* :class:`GatedCrossAttention`, :class:`FusedBackboneLayer`, :class:`FIBERFusion` — fusion
  in the backbone ("Coarse-to-Fine Vision-Language Pre-training with Fusion in the
  Backbone", FIBER): cross-attention inserted into the layers of the image and text
  backbones, ``x + α · CrossAttn(x, other)`` with a learnt scalar gate ``α`` initialised at
  0, so inserting it leaves a pretrained backbone's output exactly unchanged.
* :class:`CoAttentionLayer` — LXMERT's cross-modality layer ("LXMERT: Learning
  Cross-Modality Encoder Representations from Transformers"): bidirectional
  cross-attention (each modality attends the other, one shared cross-attention by
  default, as in the paper's code), then self-attention per modality, then a
  feed-forward per modality, each sublayer residual and post-LayerNorm (BERT's layout).

Judgement calls:

* [J] CrossViT's projections ``f`` (to the other branch's width) and ``g`` (back) are
  LayerNorm → GELU → Linear, as in the paper's code; the fusion block has no MLP (the
  paper's code sets ``has_mlp=False`` for it).
* [J] FIT: one learnt set of latents, copied to every group; the tokens are padded to a
  multiple of ``g`` (the padding is masked everywhere and cut off); every sublayer is
  pre-LN residual with a feed-forward (the FIT paper's Transformer layers).
* [J] FIBER: the gated cross-attention is pre-LN on the queries (the backbone's hidden
  states) and reads the other modality's hidden states as they are; a wrapped layer gets
  the gated cross-attention *after* it (FIBER puts it between a layer's self-attention and
  its feed-forward, which a wrapper around an arbitrary layer cannot reach); the gate is a
  plain scalar (not tanh-squashed).
* [J] LXMERT: both modalities have width ``dim`` (the paper projects the visual features
  to the hidden size first); ``share_cross=True`` shares the cross-attention and its
  LayerNorm between the two directions as the paper's code does.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import registry
from ..errors import AttentionInputError, UnsupportedPattern, fmt_shape
from .attention import Attention


def _needs_cross(method: str, layer: str) -> None:
    spec = registry.get(method)
    if "noncausal_cross" not in spec.patterns:
        raise UnsupportedPattern(f"{layer} needs a method with noncausal cross-attention; method {method!r} supports: "
                                 f"{', '.join(spec.patterns)}")


def _check_tokens(name: str, x, width: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != width:
        shape = fmt_shape(x) if isinstance(x, torch.Tensor) else type(x).__name__
        raise AttentionInputError(f"{name} must have shape (B, N, {width}), got {shape}")


def _check_padding(name: str, mask, x) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:2]):
        shape = fmt_shape(mask) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise AttentionInputError(f"{name} must be a bool tensor (B, N) = {fmt_shape(x.shape[:2])} "
                                  f"(True = padding), got {shape}")


def feed_forward(dim: int, mlp_ratio: float = 4.0) -> nn.Module:
    """``Linear(dim, r·dim) → GELU → Linear(r·dim, dim)``."""
    hidden = max(1, int(round(dim * mlp_ratio)))
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class _PreNormBlock(nn.Module):
    """``x + Attn(LN(x)[, context])`` then ``x + FF(LN(x))`` (no FF when ``mlp_ratio`` is 0)."""

    def __init__(self, dim: int, heads: int, method: str, mlp_ratio: float, context_dim: Optional[int] = None,
                 **opts):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.context_norm = nn.LayerNorm(context_dim) if context_dim else None
        self.attn = Attention(dim, heads, method=method, context_dim=context_dim, bias=True, **opts)
        self.ff = (nn.Sequential(nn.LayerNorm(dim), feed_forward(dim, mlp_ratio)) if mlp_ratio else None)

    def forward(self, x, context=None, key_padding_mask=None):
        ctx = None if context is None else self.context_norm(context)
        x = x + self.attn(self.norm(x), ctx, key_padding_mask=key_padding_mask)
        return x if self.ff is None else x + self.ff(x)


# ------------------------------------------------------------------------ CrossViT


class CrossViTFusion(nn.Module):
    """CrossViT's cross-attention fusion of two branches (tokens ``[CLS | patches]``).

    For branch ``a`` (and symmetrically ``b``, both from the *inputs*)::

        c   = f_a(a_cls)                                   (B, 1, dim_b)
        x'  = [c | b_patches]                              (B, 1 + Nb - 1, dim_b)
        y   = c + CrossAttn(query = LN(x')_0, keys/values = LN(x'))
        a'  = [g_a(y) | a_patches]                         (patches unchanged)

    Args:
        dim_a, dim_b: the branches' widths. heads: attention heads (of width
            ``dim_b // heads`` on branch ``a``'s fusion, ``dim_a // heads`` on ``b``'s).
        method, **method_options: the attention method (needs noncausal cross-attention).
    """

    def __init__(self, dim_a: int, dim_b: int, heads: int = 8, *, method: str = "softmax", **method_options):
        super().__init__()
        _needs_cross(method, "CrossViTFusion")
        self.dim_a, self.dim_b = dim_a, dim_b
        self.f_a = nn.Sequential(nn.LayerNorm(dim_a), nn.GELU(), nn.Linear(dim_a, dim_b))
        self.g_a = nn.Sequential(nn.LayerNorm(dim_b), nn.GELU(), nn.Linear(dim_b, dim_a))
        self.f_b = nn.Sequential(nn.LayerNorm(dim_b), nn.GELU(), nn.Linear(dim_b, dim_a))
        self.g_b = nn.Sequential(nn.LayerNorm(dim_a), nn.GELU(), nn.Linear(dim_a, dim_b))
        self.norm_a, self.norm_b = nn.LayerNorm(dim_b), nn.LayerNorm(dim_a)
        self.cross_a = Attention(dim_b, heads, method=method, bias=True, **method_options)
        self.cross_b = Attention(dim_a, heads, method=method, bias=True, **method_options)

    @staticmethod
    def _fuse(token, other_patches, norm, attn):
        x = norm(torch.cat([token, other_patches], dim=1))
        return token + attn(x[:, :1], context=x)

    def forward(self, a: torch.Tensor, b: torch.Tensor):
        """a: (B, 1 + Na, dim_a), b: (B, 1 + Nb, dim_b) -> (a', b'), same shapes."""
        _check_tokens("a", a, self.dim_a)
        _check_tokens("b", b, self.dim_b)
        if a.shape[0] != b.shape[0]:
            raise AttentionInputError(f"a and b must have the same batch size, got a {fmt_shape(a)}, b {fmt_shape(b)}")
        ya = self._fuse(self.f_a(a[:, :1]), b[:, 1:], self.norm_a, self.cross_a)
        yb = self._fuse(self.f_b(b[:, :1]), a[:, 1:], self.norm_b, self.cross_b)
        return torch.cat([self.g_a(ya), a[:, 1:]], dim=1), torch.cat([self.g_b(yb), b[:, 1:]], dim=1)


# ------------------------------------------------------------------------ Perceiver


class LatentCrossAttention(nn.Module):
    """Perceiver's latent bottleneck: ``num_latents`` learnt latents cross-attend the
    inputs, then ``self_layers`` latent self-attention layers (each pre-LN residual with a
    feed-forward).

        z = latents (learnt, or the previous call's output: iterative attention)
        z = z + CrossAttn(LN(z), LN(x));  z = z + FF(LN(z))
        z = z + SelfAttn(LN(z));          z = z + FF(LN(z))         (self_layers times)

    Args:
        dim: latent width. input_dim: width of the inputs (default ``dim``).
        num_latents: L. heads: self-attention heads; cross_heads: cross-attention heads
            (the paper: 1). mlp_ratio: feed-forward width (0: none).
        method, **method_options: the attention method, for both attentions.
    """

    def __init__(self, dim: int, input_dim: Optional[int] = None, num_latents: int = 64, heads: int = 8, *,
                 cross_heads: int = 1, self_layers: int = 1, mlp_ratio: float = 4.0, method: str = "softmax",
                 **method_options):
        super().__init__()
        _needs_cross(method, "LatentCrossAttention")
        if isinstance(num_latents, bool) or not isinstance(num_latents, int) or num_latents < 1:
            raise AttentionInputError(f"num_latents must be a positive int, got {num_latents!r}")
        self.dim, self.input_dim = dim, input_dim or dim
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)
        self.cross = _PreNormBlock(dim, cross_heads, method, mlp_ratio, context_dim=self.input_dim,
                                   **method_options)
        self.layers = nn.ModuleList(_PreNormBlock(dim, heads, method, mlp_ratio, **method_options)
                                    for _ in range(self_layers))

    def forward(self, x: torch.Tensor, latents: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, N, input_dim); latents: (B, L, dim) or None (the learnt ones);
        key_padding_mask: (B, N), True = padding. Returns the latents (B, L, dim)."""
        _check_tokens("x", x, self.input_dim)
        _check_padding("key_padding_mask", key_padding_mask, x)
        z = self.latents.expand(x.shape[0], -1, -1) if latents is None else latents
        _check_tokens("latents", z, self.dim)
        z = self.cross(z, x, key_padding_mask=key_padding_mask)
        for layer in self.layers:
            z = layer(z)
        return z


# ------------------------------------------------------------------------------ FIT


class FITBlock(nn.Module):
    """One FIT block over tokens in groups of ``group_size`` with ``num_latents`` latents
    per group::

        local:  x_g = LocalLayers(x_g)                    within each group     O(N·g)
        read:   z_g = z_g + CrossAttn(LN(z_g), LN(x_g))   latents ← their group
        global: z   = GlobalLayers(z)                     all groups' latents   O((N/g·L)²)
        write:  x_g = x_g + CrossAttn(LN(x_g), LN(z_g))   tokens ← their latents

    Args:
        dim: width of tokens and latents. group_size: g. num_latents: L per group.
        heads: attention heads. local_layers, global_layers: layers of each kind.
        mlp_ratio: feed-forward width of every sublayer (0: none).
        method, **method_options: the attention method (needs noncausal self and cross).
    """

    def __init__(self, dim: int, group_size: int, num_latents: int = 8, heads: int = 8, *, local_layers: int = 1,
                 global_layers: int = 1, mlp_ratio: float = 4.0, method: str = "softmax", **method_options):
        super().__init__()
        _needs_cross(method, "FITBlock")
        for name, value in (("group_size", group_size), ("num_latents", num_latents)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AttentionInputError(f"{name} must be a positive int, got {value!r}")
        self.dim, self.group_size, self.num_latents = dim, group_size, num_latents
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)
        self.local = nn.ModuleList(_PreNormBlock(dim, heads, method, mlp_ratio, **method_options)
                                   for _ in range(local_layers))
        self.read = _PreNormBlock(dim, heads, method, mlp_ratio, context_dim=dim, **method_options)
        self.global_layers = nn.ModuleList(_PreNormBlock(dim, heads, method, mlp_ratio, **method_options)
                                           for _ in range(global_layers))
        self.write = _PreNormBlock(dim, heads, method, mlp_ratio, context_dim=dim, **method_options)

    def forward(self, x: torch.Tensor, latents: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None):
        """x: (B, N, dim); latents: (B, ceil(N/g), L, dim) or None (the learnt ones);
        key_padding_mask: (B, N), True = padding. Returns ``(x', latents')``."""
        _check_tokens("x", x, self.dim)
        _check_padding("key_padding_mask", key_padding_mask, x)
        B, N, D = x.shape
        g = self.group_size
        ng = -(-N // g)
        pad = ng * g - N
        padding = key_padding_mask
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
            tail = torch.ones(B, pad, dtype=torch.bool, device=x.device)
            padding = torch.cat([torch.zeros(B, N, dtype=torch.bool, device=x.device) if padding is None
                                 else padding, tail], dim=1)
        if latents is None:
            z = self.latents.expand(B * ng, -1, -1)
        else:
            if tuple(latents.shape) != (B, ng, self.num_latents, D):
                raise AttentionInputError(f"latents must have shape (B, groups, L, dim) = "
                                          f"{fmt_shape((B, ng, self.num_latents, D))}, got {fmt_shape(latents)}")
            z = latents.reshape(B * ng, self.num_latents, D)
        xg = x.reshape(B * ng, g, D)
        pg = None if padding is None else padding.reshape(B * ng, g)
        for layer in self.local:
            xg = layer(xg, key_padding_mask=pg)
        z = self.read(z, xg, key_padding_mask=pg)
        z = z.reshape(B, ng * self.num_latents, D)
        for layer in self.global_layers:
            z = layer(z)
        z = z.reshape(B * ng, self.num_latents, D)
        xg = self.write(xg, z)
        return xg.reshape(B, ng * g, D)[:, :N], z.reshape(B, ng, self.num_latents, D)


# ---------------------------------------------------------------------------- FIBER


class GatedCrossAttention(nn.Module):
    """FIBER's gated cross-attention: ``x + α · CrossAttn(LN(x), context)``, ``α`` a learnt
    scalar initialised at ``gate_init`` (0: the layer returns ``x`` exactly until ``α``
    is trained).

    Args:
        dim: width of ``x``. context_dim: width of the other modality (default ``dim``).
        heads: attention heads. gate_init: the initial ``α``.
        method, **method_options: the attention method (needs noncausal cross-attention).
    """

    def __init__(self, dim: int, context_dim: Optional[int] = None, heads: int = 8, *, gate_init: float = 0.0,
                 method: str = "softmax", **method_options):
        super().__init__()
        _needs_cross(method, "GatedCrossAttention")
        self.dim, self.context_dim = dim, context_dim or dim
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, method=method, context_dim=self.context_dim, bias=True, **method_options)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, N, dim), context: (B, M, context_dim), key_padding_mask: (B, M) True =
        padding -> (B, N, dim)."""
        _check_tokens("x", x, self.dim)
        _check_tokens("context", context, self.context_dim)
        _check_padding("key_padding_mask", key_padding_mask, context)
        return x + self.gate.to(x.dtype) * self.attn(self.norm(x), context, key_padding_mask=key_padding_mask)


class FusedBackboneLayer(nn.Module):
    """A backbone layer with FIBER's gated cross-attention inserted after it:
    ``y = layer(x, ...)``, then ``y + α · CrossAttn(LN(y), context)`` (``α`` = 0 at
    first: the wrapped backbone computes exactly what it did). Without ``context`` it is
    the layer alone.

    Args:
        layer: any ``nn.Module`` mapping ``(B, N, dim)`` to ``(B, N, dim)``.
        dim, context_dim, heads, gate_init, method, **method_options: as
            :class:`GatedCrossAttention`.
    """

    def __init__(self, layer: nn.Module, dim: int, context_dim: Optional[int] = None, heads: int = 8, *,
                 gate_init: float = 0.0, method: str = "softmax", **method_options):
        super().__init__()
        self.layer = layer
        self.fusion = GatedCrossAttention(dim, context_dim, heads, gate_init=gate_init, method=method,
                                          **method_options)

    def forward(self, x: torch.Tensor, *args, context: Optional[torch.Tensor] = None,
                context_padding_mask: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        y = self.layer(x, *args, **kwargs)
        return y if context is None else self.fusion(y, context, key_padding_mask=context_padding_mask)


class FIBERFusion(nn.Module):
    """FIBER's two-way fusion between two backbones' hidden states at one depth: the
    image side attends the text and the text side attends the image, each behind its own
    zero-initialised gate, both from the inputs::

        a' = a + α_a · CrossAttn_a(LN(a), b)        b' = b + α_b · CrossAttn_b(LN(b), a)
    """

    def __init__(self, dim_a: int, dim_b: int, heads: int = 8, *, gate_init: float = 0.0, method: str = "softmax",
                 **method_options):
        super().__init__()
        self.a_from_b = GatedCrossAttention(dim_a, dim_b, heads, gate_init=gate_init, method=method,
                                            **method_options)
        self.b_from_a = GatedCrossAttention(dim_b, dim_a, heads, gate_init=gate_init, method=method,
                                            **method_options)

    def forward(self, a: torch.Tensor, b: torch.Tensor, a_padding_mask: Optional[torch.Tensor] = None,
                b_padding_mask: Optional[torch.Tensor] = None):
        """a: (B, Na, dim_a), b: (B, Nb, dim_b); padding masks (B, N), True = padding."""
        return (self.a_from_b(a, b, key_padding_mask=b_padding_mask),
                self.b_from_a(b, a, key_padding_mask=a_padding_mask))


# --------------------------------------------------------------------------- LXMERT


class _PostNormAttention(nn.Module):
    """BERT's attention sublayer: ``LN(x + Attn(x[, context]))``."""

    def __init__(self, dim: int, heads: int, method: str, dropout: float, **opts):
        super().__init__()
        self.attn = Attention(dim, heads, method=method, bias=True, **opts)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x, context=None, key_padding_mask=None):
        return self.norm(x + self.drop(self.attn(x, context, key_padding_mask=key_padding_mask)))


class _PostNormFeedForward(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.ff = feed_forward(dim, mlp_ratio)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(x + self.drop(self.ff(x)))


class CoAttentionLayer(nn.Module):
    """LXMERT's cross-modality layer on language tokens ``a`` and vision tokens ``b``::

        a1 = LN(a + CrossAttn(a, b))          b1 = LN(b + CrossAttn'(b, a))      (bidirectional, from the inputs)
        a2 = LN(a1 + SelfAttn_a(a1))          b2 = LN(b1 + SelfAttn_b(b1))
        a3 = LN(a2 + FF_a(a2))                b3 = LN(b2 + FF_b(b2))

    Args:
        dim: width of both modalities. heads: attention heads.
        share_cross: one cross-attention sublayer (weights and LayerNorm) for both
            directions, as the paper's code (``CrossAttn' = CrossAttn``); False: one each.
        mlp_ratio: feed-forward width. dropout: residual dropout (training mode).
        method, **method_options: the attention method (needs noncausal self and cross).
    """

    def __init__(self, dim: int, heads: int = 8, *, share_cross: bool = True, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, method: str = "softmax", **method_options):
        super().__init__()
        _needs_cross(method, "CoAttentionLayer")
        self.dim = dim
        self.cross_a = _PostNormAttention(dim, heads, method, dropout, **method_options)
        self.cross_b = self.cross_a if share_cross else _PostNormAttention(dim, heads, method, dropout,
                                                                           **method_options)
        self.self_a = _PostNormAttention(dim, heads, method, dropout, **method_options)
        self.self_b = _PostNormAttention(dim, heads, method, dropout, **method_options)
        self.ff_a = _PostNormFeedForward(dim, mlp_ratio, dropout)
        self.ff_b = _PostNormFeedForward(dim, mlp_ratio, dropout)

    def forward(self, a: torch.Tensor, b: torch.Tensor, a_padding_mask: Optional[torch.Tensor] = None,
                b_padding_mask: Optional[torch.Tensor] = None):
        """a: (B, Na, dim), b: (B, Nb, dim); padding masks (B, N), True = padding.
        Returns ``(a', b')``."""
        _check_tokens("a", a, self.dim)
        _check_tokens("b", b, self.dim)
        _check_padding("a_padding_mask", a_padding_mask, a)
        _check_padding("b_padding_mask", b_padding_mask, b)
        a1 = self.cross_a(a, b, key_padding_mask=b_padding_mask)
        b1 = self.cross_b(b, a, key_padding_mask=a_padding_mask)
        a2 = self.self_a(a1, key_padding_mask=a_padding_mask)
        b2 = self.self_b(b1, key_padding_mask=b_padding_mask)
        return self.ff_a(a2), self.ff_b(b2)


__all__ = ["CrossViTFusion", "LatentCrossAttention", "FITBlock", "GatedCrossAttention", "FusedBackboneLayer",
           "FIBERFusion", "CoAttentionLayer", "feed_forward"]

"""[CLS]-attention token pruning, training-free: keep the tokens the [CLS] token attends to
most and fuse the rest into one token.

* "Not All Patches are What You Need: Expediting Vision Transformers via Token
  Reorganizations" (EViT): between attention and MLP, keep the top-k tokens by the
  [CLS] token's attention (averaged over heads) and **fuse** the inattentive ones into
  one token, their sum weighted by that attention.
* "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM
  Inference Faster" (FasterVLM): rank tokens by the [CLS] attention of the encoder,
  training-free.

:func:`evit_prune` is the operation on a token sequence; :func:`prune_tokens` runs a Hugging
Face encoder (BERT family, ViT: a stack of layers ``layer(hidden_states, attention_mask,
...)``) with the tokens pruned after one of its layers, through hooks (the model is not
edited): the [CLS] row of that layer's attention is captured on the fly, the layer's
output is pruned, and the later layers get a mask of the new length.

Judgement calls:

* This module has its own EViT operation rather than
  :func:`attnzoo.layers.token_reduction.evit_reduce` because a tokenized batch has
  padding, which must be neither kept nor fused; a test checks the two agree on
  unpadded input with ``fusion="sum"``.
* [J] We prune after the whole block (attention and MLP) of layer ``layer``, ranking by
  that block's [CLS] attention; EViT prunes between a block's attention and its MLP,
  which needs the block's code.
* [J] The kept tokens stay in their original order (EViT sorts them by attention); a
  model with absolute positions (added at the embedding) does not care, and the output
  stays readable.
* [J] The fused token is the attention-weighted *mean* of the tokens left out, not
  EViT's attention-weighted sum (``fusion="sum"``): EViT trains with its fusion, so its
  model learns the sum's scale; a pretrained model pruned without training sees a token
  of the usual scale only with the mean (on MiniLM the mean keeps the higher cosine).
* [J] Each new token carries a *size*, the number of original tokens it stands for (1
  for a kept one, the number fused for the fused one); :func:`mean_pool` weights by it,
  so the mean-pooled sentence embedding of a pruned sequence estimates the unpruned one.

Cost: ``O(N log N)`` for the ranking, ``O(N C)`` for the fusion; the pruned layers run on
``keep + 2`` tokens instead of ``N``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from ..errors import AttentionInputError, fmt_shape


@dataclass
class Pruned:
    """Result of :func:`evit_prune`: ``x (B, N', C)`` (the [CLS], the kept tokens in their
    order, then the fused token if ``fuse``), ``index (B, k)`` the kept tokens' original
    positions, ``key_mask (B, N')`` True = a real token, ``sizes (B, N')`` the original
    tokens each one stands for."""

    x: torch.Tensor
    index: torch.Tensor
    key_mask: torch.Tensor
    sizes: torch.Tensor


def _keep_count(keep: Union[int, float], n: int) -> int:
    if isinstance(keep, float):
        if not 0.0 < keep <= 1.0:
            raise AttentionInputError(f"keep as a ratio must be in (0, 1], got {keep}")
        return max(1, int(math.ceil(keep * n)))
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise AttentionInputError(f"keep must be a positive int (tokens) or a ratio in (0, 1], got {keep!r}")
    return min(int(keep), n)


def evit_prune(x: torch.Tensor, cls_attention: torch.Tensor, keep: Union[int, float], *, fuse: bool = True,
               key_mask: Optional[torch.Tensor] = None, sizes: Optional[torch.Tensor] = None,
               fusion: str = "attention") -> Pruned:
    """Keep the [CLS] token (position 0) and the ``keep`` tokens it attends to most; fuse the rest.

    x: ``(B, N, C)``; cls_attention: ``(B, N)`` the [CLS] query's attention over the
    tokens (``(B, H, N)`` is averaged over the heads); keep: a count of non-[CLS] tokens
    or a ratio of the ``N - 1``; key_mask: ``(B, N)`` True = a real token (padding is
    never kept nor fused); sizes: ``(B, N)`` tokens each one stands for (default 1).
    The fused token is ``Σ_j a_j x_j / Σ_j a_j`` over the real tokens left out (EViT);
    a row with none left out gets a zero, masked, fused token. ``fusion="mean"``: the plain
    size-weighted mean instead; ``fusion="sum"``: EViT's unnormalised ``Σ_j a_j x_j``, which
    a model trained with it expects (:func:`attnzoo.layers.token_reduction.evit_reduce`
    is that trained-model form, without padding). Returns :class:`Pruned`.
    """
    if fusion not in ("attention", "mean", "sum"):
        raise AttentionInputError(f"fusion must be 'attention', 'mean' or 'sum', got {fusion!r}")
    if x.dim() != 3:
        raise AttentionInputError(f"x must be (B, N, C), got {fmt_shape(x)}")
    B, N, C = x.shape
    a = cls_attention.float()
    if a.dim() == 3:
        a = a.mean(1)
    if a.shape != (B, N):
        raise AttentionInputError(f"cls_attention must be (B, N) = ({B}, {N}) or (B, H, N), got "
                                  f"{fmt_shape(cls_attention)}")
    real = torch.ones(B, N, dtype=torch.bool, device=x.device) if key_mask is None else key_mask.bool().to(x.device)
    size = torch.ones(B, N, dtype=x.dtype, device=x.device) if sizes is None else sizes.to(x.dtype)
    k = _keep_count(keep, N - 1)
    score = a[:, 1:].masked_fill(~real[:, 1:], float("-inf"))
    top = score.topk(k, dim=-1).indices.sort(-1).values + 1  # (B, k): original positions, in order
    rows = torch.arange(B, device=x.device)[:, None]
    parts = [x[:, :1], x[rows, top]]
    masks = [real[:, :1], real[rows, top]]
    sz = [size[:, :1], size[rows, top] * real[rows, top]]
    if fuse:
        left = real.clone()
        left[:, 0] = False
        left[rows, top] = False
        w = ((size if fusion == "mean" else a) * left).to(x.dtype)  # the weights of the tokens left out
        fused = (w[..., None] * x).sum(1, keepdim=True)
        if fusion != "sum":
            fused = fused / w.sum(-1, keepdim=True)[..., None].clamp_min(1e-12)
        parts.append(fused)
        masks.append(left.any(-1, keepdim=True))
        sz.append((size * left).sum(-1, keepdim=True))
    return Pruned(torch.cat(parts, 1), top, torch.cat(masks, 1), torch.cat(sz, 1))


def mean_pool(hidden: torch.Tensor, key_mask: Optional[torch.Tensor] = None,
              sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of ``hidden (B, N, C)`` over the real tokens, each weighted by its size -> ``(B, C)``
    (sentence-transformers' mean pooling when every size is 1)."""
    w = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
    if key_mask is not None:
        w = w * key_mask.to(hidden.dtype)
    if sizes is not None:
        w = w * sizes.to(hidden.dtype)
    return (hidden * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-12)


def layer_stack(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer layers: the first ``nn.ModuleList`` with
    ``config.num_hidden_layers`` entries (``encoder.layer`` in BERT)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and (n is None or len(m) == n) and len(m) > 0:
            return m
    raise AttentionInputError(f"found no stack of layers in {type(model).__name__} (an nn.ModuleList of "
                              f"config.num_hidden_layers={n} layers)")


def _mask_like(original, key_mask: torch.Tensor):
    """A 4-D mask for ``key_mask (B, N')`` in the format of ``original`` (None, bool, float)."""
    if original is None and bool(key_mask.all()):
        return None
    B, N = key_mask.shape
    keys = key_mask[:, None, None, :].expand(B, 1, N, N)
    if original is None or original.dtype == torch.bool:
        return keys
    return torch.zeros(keys.shape, dtype=original.dtype, device=original.device).masked_fill(
        ~keys, torch.finfo(original.dtype).min)


@dataclass
class PruneRun:
    """Result of :func:`prune_tokens`: the model's ``output`` (its hidden states have
    ``N'`` tokens after the pruned layer) and the :class:`Pruned` bookkeeping
    (``index``, ``key_mask``, ``sizes``), plus the ``cls_attention (B, N)`` used."""

    output: object
    pruned: Pruned
    cls_attention: torch.Tensor

    @property
    def hidden(self) -> torch.Tensor:
        out = self.output
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def embedding(self) -> torch.Tensor:
        """The size-weighted mean-pooled embedding ``(B, C)``."""
        return mean_pool(self.hidden, self.pruned.key_mask, self.pruned.sizes)


def prune_tokens(model: nn.Module, inputs, *, layer: int, keep: Union[int, float] = 0.5,
                 fuse: bool = True, rank_by: str = "cls", seed: int = 0, fusion: Optional[str] = None) -> PruneRun:
    """Run a Hugging Face encoder on ``inputs`` (a tokenizer's dict) with its tokens pruned by
    [CLS] attention after layer ``layer`` (0-based): the layers after it see the [CLS],
    the ``keep`` most attended tokens and (``fuse``) one fused token. See the module doc.

    ``rank_by="random"`` is the control: the kept tokens are drawn at random (``seed``) and
    the fused token is the plain mean of the others. ``fusion``: as :func:`evit_prune`'s
    (default ``"attention"``, or ``"mean"`` with ``rank_by="random"``)."""
    if rank_by not in ("cls", "random"):
        raise AttentionInputError(f"rank_by must be 'cls' or 'random', got {rank_by!r}")
    from .capture import call_model, capturing

    stack = layer_stack(model)
    if not 0 <= int(layer) < len(stack) - 1:
        raise AttentionInputError(f"layer must be in 0..{len(stack) - 2} (a later layer must remain), got {layer}")
    key_mask = inputs.get("attention_mask") if hasattr(inputs, "get") else None
    state: dict = {}

    def after(module, args, output):
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        rows = cap.records[-1].summary["rows"].to(hidden.device)  # (B, H, 1, N)
        cls = rows[:, :, 0].mean(1)
        if rank_by == "random":
            g = torch.Generator().manual_seed(int(seed))
            cls = torch.rand(cls.shape, generator=g).to(cls.device)  # a random order
        km = None if key_mask is None else key_mask.bool().to(hidden.device)
        p = evit_prune(hidden, cls, keep, fuse=fuse, key_mask=km, fusion=fusion or ("attention" if rank_by == "cls" else "mean"))
        state.update(pruned=p, cls=cls)
        return p.x if isinstance(output, torch.Tensor) else (p.x,) + tuple(output[1:])

    def before(module, args, kwargs):
        p = state["pruned"]
        if len(args) > 1:
            args = (args[0], _mask_like(args[1], p.key_mask)) + tuple(args[2:])
        else:
            kwargs = {**kwargs, "attention_mask": _mask_like(kwargs.get("attention_mask"), p.key_mask)}
        return args, kwargs

    handles = [stack[layer].register_forward_hook(after)]
    handles += [stack[i].register_forward_pre_hook(before, with_kwargs=True) for i in range(layer + 1, len(stack))]
    try:
        with capturing(model, layers=[layer], maps=False, summaries=True, rows=(0,), device=None) as cap, \
                torch.no_grad():
            output = call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return PruneRun(output, state["pruned"], state["cls"])

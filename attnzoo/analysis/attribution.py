"""Agreement of attention with gradient attribution, by rank correlation.

"Attention is not Explanation" (Jain & Wallace, 2019) compares, per input, the ranking of
the tokens by attention with their ranking by a gradient-based importance (Kendall's τ);
its successors ("Attention Meets Perturbations", "A Song of (Dis)agreement: Evaluating
the Evaluation of Explainable Artificial Intelligence in Natural Language Processing")
measure the same agreement with rank correlations and find it weak.

* :func:`rank_correlation` — Kendall's τ-b (ties counted as the τ-b formula does) or
  Spearman's ρ (Pearson correlation of average ranks), over the last dim, on the real
  tokens only; ``O(N²)`` and ``O(N log N)`` per row.
* :func:`gradient_attribution` — per input token, gradient × input ``|Σ_c g_c e_c|`` or the
  gradient norm ``‖g‖``, with ``g = ∂score/∂e`` at the token embeddings ``e``.
* :func:`attention_importance` — per input token, the [CLS] row of a layer's attention
  (mean over heads), or the [CLS] row of the rollout (:mod:`attnzoo.analysis.aggregate`).
* :func:`attention_gradient_agreement` — both, correlated per example.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import AttentionInputError, fmt_shape


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (1-based; ties share the mean of their ranks) of a 1-D tensor."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(1, x.numel() + 1, dtype=torch.float64)
    for val in torch.unique(x):
        tie = x == val
        if int(tie.sum()) > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def _kendall(x: torch.Tensor, y: torch.Tensor) -> float:
    dx = torch.sign(x[:, None] - x[None, :])
    dy = torch.sign(y[:, None] - y[None, :])
    iu = torch.triu_indices(x.numel(), x.numel(), 1)
    dx, dy = dx[iu[0], iu[1]], dy[iu[0], iu[1]]
    num = float((dx * dy).sum())
    den = float(((dx != 0).sum() * (dy != 0).sum()).double().sqrt())
    return num / den if den > 0 else float("nan")


def _spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / den if den > 0 else float("nan")


def rank_correlation(x: torch.Tensor, y: torch.Tensor, method: str = "kendall",
                     mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rank correlation of ``x`` and ``y`` (same shape ``(..., N)``) along the last dim ->
    ``(...)`` float64, over the entries where ``mask`` (True = keep) holds. ``method``:
    ``"kendall"`` (τ-b) or ``"spearman"``. 1 for the same order, -1 for the reverse; NaN
    for a row with fewer than two entries or a constant row."""
    if method not in ("kendall", "spearman"):
        raise AttentionInputError(f"method must be 'kendall' or 'spearman', got {method!r}")
    if x.shape != y.shape:
        raise AttentionInputError(f"x and y must have the same shape, got {fmt_shape(x)} and {fmt_shape(y)}")
    fn = _kendall if method == "kendall" else _spearman
    xs, ys = x.detach().double().reshape(-1, x.shape[-1]), y.detach().double().reshape(-1, y.shape[-1])
    ms = None if mask is None else mask.bool().expand_as(x).reshape(-1, x.shape[-1])
    out = torch.empty(xs.shape[0], dtype=torch.float64)
    for i in range(xs.shape[0]):
        a, b = (xs[i], ys[i]) if ms is None else (xs[i][ms[i]], ys[i][ms[i]])
        out[i] = fn(a, b) if a.numel() >= 2 else float("nan")
    return out.reshape(x.shape[:-1])


def _embedding_module(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_input_embeddings", None)
    if callable(get) and get() is not None:
        return get()
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return m
    raise AttentionInputError(f"{type(model).__name__} has no input embedding to attribute to; pass embedding=")


def default_score(output) -> torch.Tensor:
    """The scalar a default attribution explains: the summed max logit, or the norm of the
    mean of the last hidden states (a sentence embedding) per example, summed."""
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, torch.Tensor):
        logits = output
    if logits is not None:
        return logits.reshape(logits.shape[0], -1).max(-1).values.sum()
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    return hidden.mean(1).norm(dim=-1).sum()


def gradient_attribution(model: nn.Module, inputs, score: Optional[Callable] = None, *,
                         embedding: Optional[nn.Module] = None, kind: str = "grad_x_input") -> torch.Tensor:
    """``(B, N)``: the importance of each input token for ``score(model(inputs))`` (a scalar;
    default :func:`default_score`), from the gradient at the token embeddings (the output
    of ``embedding``, default the model's input embedding). ``kind``: ``"grad_x_input"``
    ``|Σ_c g_c e_c|`` or ``"grad_norm"`` ``‖g‖₂``."""
    from .capture import call_model

    if kind not in ("grad_x_input", "grad_norm"):
        raise AttentionInputError(f"kind must be 'grad_x_input' or 'grad_norm', got {kind!r}")
    emb = embedding or _embedding_module(model)
    saved: dict = {}

    def hook(module, args, output):
        output.retain_grad()
        saved["e"] = output

    h = emb.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            s = (score or default_score)(call_model(model, inputs))
            if not isinstance(s, torch.Tensor) or s.numel() != 1:
                raise AttentionInputError("score must return a scalar tensor")
            s.backward()
    finally:
        h.remove()
    e = saved["e"]
    g = e.grad
    model.zero_grad(set_to_none=True)
    return ((g * e).sum(-1).abs() if kind == "grad_x_input" else g.norm(dim=-1)).detach()


def attention_importance(cap, source: str = "cls", layer: int = -1) -> torch.Tensor:
    """``(B, N)``: each token's importance by attention, from a :class:`~attnzoo.analysis.Capture`:
    ``"cls"`` the [CLS] (first) row of layer ``layer``'s attention averaged over heads,
    ``"rollout"`` the [CLS] row of the attention rollout (needs ``maps``)."""
    if source == "cls":
        return cap.rows()[layer][:, :, 0].mean(1)
    if source == "rollout":
        from .aggregate import attention_rollout

        return attention_rollout(cap.maps())[:, 0].float()
    raise AttentionInputError(f"source must be 'cls' or 'rollout', got {source!r}")


def attention_gradient_agreement(model: nn.Module, inputs, score: Optional[Callable] = None, *,
                                 source: str = "cls", layer: int = -1, method: str = "kendall",
                                 kind: str = "grad_x_input") -> dict:
    """Per example, the rank correlation between the tokens' attention importance
    (:func:`attention_importance`) and their gradient attribution
    (:func:`gradient_attribution`), over the real tokens (``inputs["attention_mask"]``).

    Returns ``{"per_example": (B,) float64, "mean": float, "attention": (B, N),
    "attribution": (B, N)}``."""
    from .capture import capture

    cap = capture(model, inputs, maps=source == "rollout")
    att = attention_importance(cap, source, layer)
    grad = gradient_attribution(model, inputs, score, kind=kind).to(att.device)
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    corr = rank_correlation(att, grad.float(), method, None if mask is None else mask.bool())
    finite = corr[torch.isfinite(corr)]
    return {"per_example": corr, "mean": float(finite.mean()) if finite.numel() else float("nan"),
            "attention": att, "attribution": grad}

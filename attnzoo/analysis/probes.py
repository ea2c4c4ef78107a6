"""Probes: inputs built so that the right attention is known, and the runs that compare them.

* :func:`repeat_probe` — a text followed by itself, for an encoder: a query of the second
  copy "retrieves" when its most attended key is the same token in the first copy (the
  needle). With the query's own token as the target, the retrieval score
  (:func:`~attnzoo.analysis.metrics.retrieval_score`) becomes a duplicate-token score,
  the form of retrieval an encoder without a language-model head can show. [J] The
  retrieval-head paper scores copies during generation; on an encoder there is no
  generated token, and copying the repeated token is the nearest known answer.
* :func:`context_ablation` — the same input with part of its context replaced (e.g. by
  ``[MASK]``): per head, the Jensen–Shannon divergence of the attention
  (:func:`~attnzoo.analysis.metrics.head_divergence`) and the change of the head's output
  (:func:`~attnzoo.analysis.metrics.head_output_divergence`, VHD's sensitivity).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import AttentionInputError
from . import metrics
from .capture import capture


def repeat_probe(tokenizer, text: str, max_tokens: int = 48) -> dict:
    """``{"inputs", "tokens" (1, N), "targets" (1, N), "needle" (1, N)}`` for ``text text``.

    The text is tokenized without special tokens (cut to ``max_tokens``), then framed as
    ``[CLS] t [SEP] t [SEP]`` (segment ids 0 then 1) when the tokenizer has those tokens,
    else repeated plainly; ``targets`` holds the
    token at each position of the second copy (``-100`` elsewhere), ``needle`` marks the
    first copy."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    if not ids:
        raise AttentionInputError(f"text {text!r} has no tokens")
    cls, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    if cls is not None and sep is not None:  # BERT's frame, built from the ids (no re-tokenization)
        row = [cls] + ids + [sep] + ids + [sep]
        n = len(ids)
        tokens = torch.tensor([row])
        half = torch.tensor([[False] * (n + 2) + [True] * (n + 1)])
        enc = {"input_ids": tokens, "token_type_ids": half.long(), "attention_mask": torch.ones_like(tokens)}
        special = torch.zeros_like(half)
        special[0, [0, n + 1, 2 * n + 2]] = True
    else:  # a tokenizer without [CLS]/[SEP]: the plain repetition
        tokens = torch.tensor([ids + ids])
        n = len(ids)
        half = torch.tensor([[False] * n + [True] * n])
        enc = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
        special = torch.zeros_like(half)
    second = half & ~special
    first = ~half & ~special
    targets = torch.where(second, tokens, torch.full_like(tokens, metrics.IGNORE))
    return {"inputs": enc, "tokens": tokens, "targets": targets, "needle": first}


def retrieval_probe_scores(model, tokenizer, text: str, max_tokens: int = 48) -> torch.Tensor:
    """``(L, H)`` duplicate-token retrieval scores of an encoder on :func:`repeat_probe`."""
    p = repeat_probe(tokenizer, text, max_tokens)
    cap = capture(model, p["inputs"], maps=False)
    return cap.retrieval_score(p["tokens"], p["targets"], p["needle"]).mean(1)


def ablate_tokens(inputs, positions: Sequence[int], token_id: int):
    """A copy of a tokenizer's ``inputs`` with ``input_ids[:, positions]`` set to ``token_id``."""
    out = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in dict(inputs).items()}
    ids = out["input_ids"]
    for p in positions:
        if not -ids.shape[1] <= int(p) < ids.shape[1]:
            raise AttentionInputError(f"position {p} is outside the {ids.shape[1]} tokens")
        ids[:, int(p)] = int(token_id)
    return out


def context_ablation(model, inputs, ablated_inputs, *, layers: Optional[Sequence[int]] = None) -> dict:
    """Per head, how much the attention and the output move when the context is ablated.

    ``inputs`` and ``ablated_inputs`` must have the same shape (replace tokens, do not
    remove them: :func:`ablate_tokens`). Returns ``{"attention": (L, H)`` mean JS
    divergence over the real queries and the batch, ``"output": (L, H)`` mean ``1 - cos``
    of the heads' outputs``}``."""
    a = capture(model, inputs, layers=layers, outputs=True)
    b = capture(model, ablated_inputs, layers=layers, outputs=True)
    qm = a.query_mask
    js = metrics.head_divergence(a.maps(), b.maps(), query_mask=qm).mean(1)
    out = metrics.head_output_divergence(a._stack("out"), b._stack("out"), query_mask=qm).mean(1)
    return {"attention": js, "output": out}

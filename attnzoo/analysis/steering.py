"""Training-free steering: edit a model's attention as it runs, through the same backend as
capture (:mod:`attnzoo.analysis.backends`), without editing the model.

    with steer(model, mask_heads=[(1, 0), (1, 3)]):          # heads switched off
        logits = model(tokens)
    with steer(model, head_scale={(0, 2): 1.5}):             # a head amplified
        ...
    with steer(model, calibrate=SinkCalibration(heads=[(3, 1)], sinks="auto", beta=0.4)):   # ACT
        ...

* **Head masking / reweighting** multiplies a head's output ``o_h = A_h V_h`` by a
  factor (0 switches it off) before the output projection, which is the same as scaling
  its attention row: any method, no weights needed. :func:`head_ablation` masks each head
  in turn and reports a score (e.g. accuracy), to find the heads a task needs.
* **Sink calibration** (ACT, "Unveiling and Harnessing Hidden Attention Sinks:
  Enhancing Large Language Models without Training through Attention Calibration"):
  in the chosen heads the attention on the sink keys is damped, ``a'_is = β a_is``, and
  the mass taken off is handed to the other keys in proportion to their weights,
  ``a'_ij = a_ij (1 - β S_i)/(1 - S_i)`` with ``S_i = Σ_s a_is`` — each row still sums to
  1 — and the head's output is recomputed, ``o = A' V``. [J] ACT scales the sink scores
  and redistributes to the rest; proportional redistribution (renormalising the
  non-sink part) is our reading. With ``sinks="auto"`` the sinks are found per head and
  input by :func:`~attnzoo.analysis.metrics.find_sinks` (``alpha``) and, [J] as ACT keeps
  the start-of-sequence sink, the first token is left alone unless ``keep_first=False``.

Layers are numbered as in capture (the ``i``-th attention layer); heads are query heads.
Steering composes with capture: a capture opened inside a ``steer`` context records the
edited weights and outputs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

import torch

from ..errors import AttentionInputError, fmt_shape
from . import metrics
from .backends import Site, expand_heads, intercept

HeadSet = Union[None, Iterable, dict]


def calibrate_sinks(maps: torch.Tensor, sinks: torch.Tensor, beta: float = 0.4) -> torch.Tensor:
    """ACT's calibration of attention rows: ``maps (..., Nq, Nk)``, ``sinks`` bool
    broadcastable to ``(..., Nk)`` (the sink keys, per head) -> maps of the same shape.

    ``a'_is = β a_is`` on the sinks; the other keys share the removed mass in proportion,
    ``a'_ij = a_ij (1 - β S_i)/(1 - S_i)``; row sums are kept. A row with all its mass on
    sinks (nothing to hand the mass to) is left unchanged. ``β = 1`` changes nothing.
    """
    if not 0.0 <= float(beta) <= 1.0:
        raise AttentionInputError(f"beta must be in [0, 1], got {beta}")
    a = maps
    sel = torch.as_tensor(sinks, device=a.device).bool()
    if sel.shape[-1] != a.shape[-1]:
        raise AttentionInputError(f"sinks must have Nk={a.shape[-1]} entries on its last dim, got {fmt_shape(sel)}")
    sel = sel.unsqueeze(-2)  # (..., 1, Nk): the same keys for every query
    s = (a * sel).sum(-1, keepdim=True)
    rest = a.sum(-1, keepdim=True) - s
    factor = torch.where(rest > 1e-12, (rest + (1 - beta) * s) / rest.clamp_min(1e-12), torch.ones_like(rest))
    damp = torch.where(rest > 1e-12, torch.full_like(rest, float(beta)), torch.ones_like(rest))
    return torch.where(sel, a * damp, a * factor)


@dataclass
class SinkCalibration:
    """Which heads to calibrate and how (see the module doc).

    ``heads``: ``[(layer, head)]``, ``{layer: [heads]}``, or None (every head of every
    layer); ``sinks``: ``"auto"``, key positions, or a bool ``(B, Nk)`` / ``(Nk,)`` mask;
    ``beta``: what is left of a sink's attention; ``alpha``: the threshold of ``"auto"``
    (a key receiving more than ``alpha / n`` of the attention); ``keep_first``: leave the
    first token out of the ``"auto"`` sinks.
    """

    heads: HeadSet = None
    sinks: Union[str, int, Iterable, torch.Tensor] = "auto"
    beta: float = 0.4
    alpha: float = 5.0
    keep_first: bool = True


def _head_table(heads: HeadSet) -> Optional[dict]:
    """``{layer: set(heads) or None (all)}`` from ``[(l, h)]`` / ``{l: [h]}``; None = everything."""
    if heads is None:
        return None
    if isinstance(heads, dict):
        return {int(l): (None if hs is None else {int(h) for h in hs}) for l, hs in heads.items()}
    out: dict = {}
    for item in heads:
        try:
            l, h = item
        except (TypeError, ValueError):
            raise AttentionInputError(f"heads are given as (layer, head) pairs, got {item!r}") from None
        out.setdefault(int(l), set()).add(int(h))
    return out


def _selected(table: Optional[dict], layer: int, H: int) -> list:
    if table is None:
        return list(range(H))
    if layer not in table:
        return []
    hs = table[layer]
    return list(range(H)) if hs is None else sorted(h for h in hs if 0 <= h < H)


class _Steerer:
    def __init__(self, scales: dict, calibrate: Optional[SinkCalibration]):
        self.scales = scales  # (layer, head) -> factor
        self.calibrate = calibrate
        self.cal_heads = None if calibrate is None else _head_table(calibrate.heads)

    def _cal(self, site: Site, H: int) -> list:
        return [] if self.calibrate is None else _selected(self.cal_heads, site.index, H)

    def wants_weights(self, site: Site) -> bool:
        return self.calibrate is not None and (self.cal_heads is None or site.index in self.cal_heads)

    def _sinks(self, site: Site, w: torch.Tensor) -> torch.Tensor:
        c = self.calibrate
        Nk = w.shape[-1]
        if isinstance(c.sinks, str):
            if c.sinks != "auto":
                raise AttentionInputError(f"sinks must be 'auto', positions or a bool mask, got {c.sinks!r}")
            sel = metrics.find_sinks(w, alpha=c.alpha, key_mask=site.key_mask)  # (B, h, Nk)
            if c.keep_first:
                sel = sel.clone()
                sel[..., 0] = False
            return sel
        sel = metrics._sink_selector(c.sinks, Nk, w.device)
        return sel[:, None, :] if sel.dim() == 2 else sel

    def __call__(self, site: Site, q, k, v, out, weights):
        H = q.shape[1]
        hs = self._cal(site, H)
        if hs:
            if weights is None:
                raise AttentionInputError(f"layer {site.index} ({site.name}) returned no attention weights to calibrate")
            w = weights.clone()
            sub = w[:, hs].float()
            sub = calibrate_sinks(sub, self._sinks(site, sub), self.calibrate.beta)
            w[:, hs] = sub.to(w.dtype)
            vv = expand_heads(v, H)[:, hs]
            out = out.clone()
            out[:, hs] = (sub.to(torch.float64 if v.dtype == torch.float64 else torch.float32)
                          @ vv.to(sub.dtype)).to(out.dtype)
            weights = w
        factors = [(h, s) for (l, h), s in self.scales.items() if l == site.index and 0 <= h < H]
        if factors:
            scale = torch.ones(H, dtype=out.dtype, device=out.device)
            for h, s in factors:
                scale[h] = s
            out = out * scale[None, :, None, None]
        return out, weights


@contextlib.contextmanager
def steer(model, *, mask_heads: Optional[Iterable] = None, head_scale: Union[None, dict, torch.Tensor] = None,
          calibrate: Optional[SinkCalibration] = None):
    """Steer ``model`` while the context is open (see the module doc).

    Args:
        mask_heads: ``[(layer, head)]`` switched off (their outputs multiplied by 0).
        head_scale: ``{(layer, head): factor}`` or a ``(L, H)`` tensor of factors.
        calibrate: a :class:`SinkCalibration` (ACT).
    """
    scales: dict = {}
    if isinstance(head_scale, torch.Tensor):
        if head_scale.dim() != 2:
            raise AttentionInputError(f"head_scale as a tensor must be (layers, heads), got {fmt_shape(head_scale)}")
        scales.update({(l, h): float(head_scale[l, h]) for l in range(head_scale.shape[0])
                       for h in range(head_scale.shape[1]) if float(head_scale[l, h]) != 1.0})
    elif head_scale is not None:
        scales.update({(int(l), int(h)): float(s) for (l, h), s in dict(head_scale).items()})
    for l, h in (mask_heads or ()):
        scales[(int(l), int(h))] = 0.0
    with intercept(model, _Steerer(scales, calibrate)):
        yield


def head_shape(model, inputs) -> tuple:
    """``(layers, heads)`` of ``model``'s attention, found by running it once on ``inputs``."""
    from .capture import capture

    cap = capture(model, inputs, maps=False, summaries=False)
    hs = {len(r.heads) for r in cap.records}
    if len(hs) != 1:
        raise AttentionInputError(f"the layers have different head counts ({sorted(hs)})")
    return len(cap.records), hs.pop()


def head_ablation(model, score: Callable[[], float], shape: tuple) -> torch.Tensor:
    """``(L, H)``: ``score()`` (e.g. a task's accuracy; it runs the model) with each head
    switched off in turn. ``shape``: ``(layers, heads)`` (see :func:`head_shape`)."""
    L, H = shape
    out = torch.zeros(L, H, dtype=torch.float64)
    for l in range(L):
        for h in range(H):
            with steer(model, mask_heads=[(l, h)]):
                out[l, h] = float(score())
    return out

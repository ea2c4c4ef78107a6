"""Capture the attention of a model — maps, q/k/v, head outputs, or summaries computed on
the fly — without editing it.

    cap = capture(model, inputs)                       # every layer and head
    cap.maps()                                         # (L, B, H, Nq, Nk)
    cap.entropy(), cap.sink_score([0, -1])            # (L, B, H) tables
    cap = capture(model, inputs, layers=[0, 5], heads=[2, 3], qkv=True)
    cap = capture(model, long_inputs, maps=False, query_chunk=256)   # summaries only, O(chunk·N) per head

``model``: a module built from :class:`attnzoo.layers.Attention` layers or a Hugging Face
``PreTrainedModel`` (see :mod:`attnzoo.analysis.backends` for how each is intercepted);
``inputs``: a dict (``model(**inputs)``, e.g. a tokenizer's output), a tuple
(``model(*inputs)``) or a tensor (``model(inputs)``). The model's output is
``cap.output``. :func:`capturing` is the context-manager form (for ``generate`` or any
code that calls the model itself).

Memory. ``maps=True`` keeps the ``(B, h, Nq, Nk)`` weights of the chosen layers and
heads. The summaries — per query: entropy, attention distance, argmax key and its
weight; per key: the mass it receives; and the full weights of a few query rows
(``rows``, default the first, the [CLS] row) — are ``O(N)`` per head and are computed
as each layer runs, from the layer's weights, which are then dropped. With
``query_chunk`` and ``maps=False``, a softmax layer's weights are not even materialised
whole: they are recomputed from q and k a chunk of queries at a time (``O(chunk · N)``
per head), while the model itself runs its fast path. Layers outside ``layers`` are not
asked for weights at all, so they keep their fast path too (a layer asked for weights
runs an implementation that returns them — the reference for most methods — equal to the
fast one up to float rounding).

Summaries are float32 and moved to ``device`` (default the CPU) as they are taken.

The weights are attnzoo's: on a Hugging Face model they equal ``output_attentions`` on
every real query; a padded query that may attend to nothing (left padding in a causal
model) gets a zero row, where eager attention returns a uniform one. The tables leave
padded queries out (``query_mask``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from ..errors import AttentionInputError
from . import metrics
from .backends import Site, expand_heads, intercept, softmax_weights

Heads = Union[None, Sequence[int], dict]


@dataclass
class LayerRecord:
    """What one attention call left: ``index`` (layer), ``name`` (module), ``heads`` (the
    captured query heads), and — as asked — ``maps (B, h, Nq, Nk)``, ``q (B, h, Nq, D)``,
    ``k, v (B, Hkv, Nk, ·)``, ``out (B, h, Nq, Dv)`` (the heads' outputs, before the output
    projection) and ``summary`` (name -> tensor, see :class:`Capture`)."""

    index: int
    name: str
    method: str
    heads: list
    maps: Optional[torch.Tensor] = None
    q: Optional[torch.Tensor] = None
    k: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None
    out: Optional[torch.Tensor] = None
    summary: dict = field(default_factory=dict)


class Capture:
    """The records of a :func:`capture`, in call order, and per-head tables from them.

    Summaries per record: ``entropy``, ``distance``, ``argmax``, ``max`` (each ``(B, h,
    Nq)``), ``key_mass_sum`` ``(B, h, Nk)`` (the weights summed over the real queries),
    ``rows`` ``(B, h, R, Nk)`` (the weights of query rows ``row_index``). Table methods
    return ``(L, B, h)``, computed from the summaries (equal to the metric functions of
    :mod:`attnzoo.analysis.metrics` on the maps, which a test checks).
    """

    def __init__(self, query_mask=None, row_index=(0,)):
        self.records: list = []
        self.output = None
        self.query_mask = query_mask
        self.row_index = tuple(row_index)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.records)

    @property
    def layers(self) -> list:
        return [r.index for r in self.records]

    @property
    def names(self) -> list:
        return [r.name for r in self.records]

    def _stack(self, attr: str) -> torch.Tensor:
        vals = [getattr(r, attr) if attr in ("maps", "q", "k", "v", "out") else r.summary.get(attr)
                for r in self.records]
        if not self.records or any(v is None for v in vals):
            raise AttentionInputError(f"this capture has no {attr!r} for every layer (capture(..., "
                                      f"{'maps=True' if attr == 'maps' else attr + '=True'}) keeps it)")
        try:
            return torch.stack(vals)
        except RuntimeError as e:
            raise AttentionInputError(f"the layers' {attr} differ in shape (choose layers with the same heads): "
                                      f"{e}") from e

    def maps(self) -> torch.Tensor:
        """``(L, B, h, Nq, Nk)``: the captured weights, layer by layer."""
        return self._stack("maps")

    def summary(self, name: str) -> torch.Tensor:
        """One summary stacked over the layers, ``(L, ...)``."""
        return self._stack(name)

    def _qmask(self):
        return self.query_mask

    # ------------------------------------------------------------------ tables
    def entropy(self) -> torch.Tensor:
        """Mean attention entropy (nats) per head, ``(L, B, h)``."""
        return metrics.reduce_queries(self.summary("entropy"), self._qmask())

    def distance(self) -> torch.Tensor:
        """Mean attention distance (tokens) per head, ``(L, B, h)``."""
        return metrics.reduce_queries(self.summary("distance"), self._qmask())

    def key_mass(self) -> torch.Tensor:
        """Mass each key receives, averaged over the real queries, ``(L, B, h, Nk)``."""
        s = self.summary("key_mass_sum")
        n = self.summary("queries")  # (L, B)
        return s / n[:, :, None, None].clamp_min(1)

    def sink_score(self, sinks=0) -> torch.Tensor:
        """:func:`~attnzoo.analysis.metrics.sink_score` per head, ``(L, B, h)``."""
        return metrics.sink_score_from_mass(self.key_mass(), sinks)

    def retrieval_score(self, tokens, targets, needle=None) -> torch.Tensor:
        """:func:`~attnzoo.analysis.metrics.retrieval_score` per head, ``(L, B, h)``."""
        return metrics.retrieval_from_argmax(self.summary("argmax"), tokens, targets, needle,
                                             query_mask=self._qmask())

    def rows(self) -> torch.Tensor:
        """The weights of the query rows ``row_index``, ``(L, B, h, R, Nk)``."""
        return self.summary("rows")


def _heads_for(heads: Heads, layer: int, H: int) -> list:
    if heads is None:
        return list(range(H))
    sel = heads.get(layer, list(range(H))) if isinstance(heads, dict) else heads
    out = [int(h) for h in sel]
    for h in out:
        if not 0 <= h < H:
            raise AttentionInputError(f"head {h} of layer {layer} is outside its {H} heads")
    return out


class _Recorder:
    """The capture handler: records the sites it is asked for."""

    def __init__(self, cap: Capture, layers, heads, maps, summaries, qkv, outputs, query_chunk, device, dtype):
        self.cap, self.layers, self.heads = cap, None if layers is None else {int(i) for i in layers}, heads
        self.keep_maps, self.summaries, self.qkv, self.outputs = maps, summaries, qkv, outputs
        self.query_chunk, self.device, self.dtype = query_chunk, device, dtype

    def chosen(self, site: Site) -> bool:
        return self.layers is None or site.index in self.layers

    def wants_weights(self, site: Site) -> bool:
        if not self.chosen(site) or not (self.keep_maps or self.summaries):
            return False
        return self.keep_maps or not (self.query_chunk and site.dense_softmax)

    def _put(self, t):
        return t.detach().to(device=self.device, dtype=self.dtype if t.is_floating_point() else t.dtype)

    def __call__(self, site: Site, q, k, v, out, weights):
        if not self.chosen(site):
            return out, weights
        H, Nq, Nk = q.shape[1], q.shape[2], k.shape[2]
        hs = _heads_for(self.heads, site.index, H)
        rec = LayerRecord(site.index, site.name, site.method, hs)
        if self.keep_maps:
            if weights is None:
                raise AttentionInputError(f"layer {site.index} ({site.name}) returned no attention weights")
            rec.maps = self._put(weights[:, hs])
        if self.qkv:
            rec.q, rec.k, rec.v = self._put(q[:, hs]), self._put(k), self._put(v)
        if self.outputs:
            rec.out = self._put(out[:, hs])
        if self.summaries:
            rec.summary = self._summarise(site, q, k, weights, hs, Nq, Nk)
        self.cap.records.append(rec)
        return out, weights

    def _query_mask(self, B, Nq, device):
        m = self.cap.query_mask
        if m is None or tuple(m.shape) != (B, Nq):
            return torch.ones(B, Nq, dtype=torch.bool, device=device)
        return m.bool().to(device)

    def _summarise(self, site, q, k, weights, hs, Nq, Nk) -> dict:
        B, dev = q.shape[0], q.device
        qmask = self._query_mask(B, Nq, dev)
        chunk = self.query_chunk if (weights is None and self.query_chunk) else Nq
        parts = {"entropy": [], "distance": [], "argmax": [], "max": []}
        mass = torch.zeros(B, len(hs), Nk, dtype=torch.float64, device=dev)
        rows = [r if r >= 0 else Nq + r for r in self.cap.row_index if -Nq <= r < Nq]
        row_maps = {}
        sub = site
        if weights is None and site.mask is not None and site.mask.dim() == 4 and site.mask.shape[1] > 1:
            sub = dataclasses.replace(site, mask=site.mask[:, hs])  # a per-head mask, to the kept heads
        for start in range(0, Nq, chunk):
            stop = min(Nq, start + chunk)
            if weights is not None:
                w = weights[:, hs, start:stop].float()
            else:
                w = softmax_weights(sub, q[:, hs], expand_heads(k, q.shape[1])[:, hs], slice(start, stop)).float()
            pos = torch.arange(start, stop, device=dev) + (Nk - Nq)
            parts["entropy"].append(metrics.entropy(w, per_query=True))
            parts["distance"].append(metrics.attention_distance(w, per_query=True, query_positions=pos))
            mx, am = w.max(-1)
            parts["argmax"].append(am)
            parts["max"].append(mx)
            qm = qmask[:, None, start:stop, None].to(w.dtype)
            mass += (w * qm).sum(-2).double()
            for r in rows:
                if start <= r < stop:
                    row_maps[r] = w[:, :, r - start]
        out = {name: self._put(torch.cat(v, dim=-1)) for name, v in parts.items()}
        out["key_mass_sum"] = self._put(mass)
        out["queries"] = self._put(qmask.sum(-1).double())
        if rows:
            out["rows"] = self._put(torch.stack([row_maps[r] for r in rows], dim=2))
        return out


def _auto_query_mask(inputs):
    if isinstance(inputs, Mapping) and isinstance(inputs.get("attention_mask"), torch.Tensor):
        m = inputs["attention_mask"]
        return m.bool() if m.dim() == 2 else None
    return None


@contextlib.contextmanager
def capturing(model, *, layers: Optional[Sequence[int]] = None, heads: Heads = None, maps: bool = True,
              summaries: bool = True, qkv: bool = False, outputs: bool = False, rows: Sequence[int] = (0,),
              query_chunk: Optional[int] = None, query_mask: Optional[torch.Tensor] = None, device="cpu",
              dtype=torch.float32):
    """Context manager: every attention call of ``model`` inside it is recorded into the
    :class:`Capture` it yields (arguments as :func:`capture`)."""
    if query_chunk is not None and int(query_chunk) < 1:
        raise AttentionInputError(f"query_chunk must be a positive int, got {query_chunk}")
    cap = Capture(query_mask=query_mask, row_index=rows)
    rec = _Recorder(cap, layers, heads, maps, summaries, qkv, outputs, query_chunk, device, dtype)
    with intercept(model, rec):
        yield cap


def capture(model, inputs, *, layers: Optional[Sequence[int]] = None, heads: Heads = None, maps: bool = True,
            summaries: bool = True, qkv: bool = False, outputs: bool = False, rows: Sequence[int] = (0,),
            query_chunk: Optional[int] = None, query_mask: Union[str, torch.Tensor, None] = "auto", device="cpu",
            dtype=torch.float32, grad: bool = False) -> Capture:
    """Run ``model`` on ``inputs`` and capture its attention.

    Args:
        model: attnzoo layers or a Hugging Face model (see the module doc).
        inputs: a dict, tuple or tensor (see the module doc).
        layers: the layers to capture (default all); the others run untouched.
        heads: the query heads to keep, for every layer (a list) or per layer (a dict
            ``{layer: [heads]}``); default all.
        maps: keep the weights ``(B, h, Nq, Nk)``.
        summaries: compute the per-query and per-key summaries (``O(N)`` per head).
        qkv: keep q (of the chosen heads), k and v. outputs: keep the heads' outputs.
        rows: query rows whose full weights are kept in the summaries (default ``(0,)``,
            the [CLS] row; negative counts from the end).
        query_chunk: with ``maps=False``, recompute softmax layers' weights this many
            queries at a time instead of materialising them.
        query_mask: ``(B, Nq)`` True = a real query (excluded otherwise from the tables);
            ``"auto"`` takes ``inputs["attention_mask"]`` when there is one.
        device, dtype: where and in what the records are kept (float32 on the CPU).
        grad: run with autograd on (default: under ``torch.no_grad``).

    Returns a :class:`Capture` (``.output`` holds the model's output).
    """
    qm = _auto_query_mask(inputs) if isinstance(query_mask, str) else query_mask
    with capturing(model, layers=layers, heads=heads, maps=maps, summaries=summaries, qkv=qkv, outputs=outputs,
                   rows=rows, query_chunk=query_chunk, query_mask=qm, device=device, dtype=dtype) as cap:
        with torch.set_grad_enabled(grad):
            cap.output = call_model(model, inputs)
    return cap


def call_model(model, inputs):
    """``model(**inputs)``, ``model(*inputs)`` or ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)

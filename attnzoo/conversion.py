"""Convert a pretrained Hugging Face model to another attention method: ``attnzoo.convert``.

    import attnzoo as az
    model = AutoModel.from_pretrained(path)
    model = az.convert(model, "hedgehog", tokenizer=tokenizer)        # distilled on attnzoo's sentences
    model.attnzoo_conversion.layers[0].kl_after                      # what the distillation reached
    model = az.convert(AutoModel.from_pretrained(path), "sliding_window", options={"window": 16})

Every attention layer of the model is swapped for the method through the Hugging Face
backends (:func:`attnzoo.integrations.hf.register_method` and
``model.set_attn_implementation(key)``): the projections, MLPs and norms stay, only the
attention between the queries and keys the model computes changes.

Methods with parameters (``spec.module``: hedgehog, selective, agent, inline, routing,
seer, ...) get one module per attention layer (``attnzoo.build(method, heads=...,
kv_heads=..., head_dim=..., **options)``), attached to the layer's attention module as
``attnzoo_module`` (the hook the backends call), and **distilled** to mimic the original
attention — Hedgehog's attention-weight distillation ("The Hedgehog & the Porcupine:
Expressive Linear Attentions with Softmax Mimicry"): the model runs once on sample texts
with a private capture backend that records each layer's queries, keys, values and mask
(and computes exact softmax, so every layer sees the original activations); then, layer
by layer and teacher-forced on those inputs, Adam minimises the cross-entropy between the
teacher's softmax weights ``P`` and the method's weights ``Â``,
``-Σ_j P_ij log Â_ij`` averaged over the real (unpadded) query rows (padded keys carry no
weight on either side). [J] ``output_weight`` (default 1) adds the relative squared error
of the attention outputs, ``|Ô - O|² / |O|²``, which trains what the weights do not
contain (agent's and inline's depthwise convolutions over V, selective's value
temperature); 0 gives the paper's loss alone. Two methods are fitted their own way:
routing's centroids are buffers, fitted by online k-means on the captured queries and
keys; seer's gate selects blocks by top-k (no gradient reaches it through the weights) and
is trained with its self-distillation, :func:`attnzoo.methods.sparse.seer.train_gate`.

Methods without parameters (linear, sliding_window, flow, ...) are swapped without
distillation, and so are methods with parameters when ``steps=0``.

The result: the model itself, converted in place, with ``model.attnzoo_conversion`` — a
:class:`Conversion` (the method, the backend key, the options, the per-layer
:class:`LayerRecord` s with the KL before and after, the losses and the time). A method
that cannot run the model raises before anything is changed: a pattern it lacks (a
causal-only method on an encoder: :class:`~attnzoo.UnsupportedPattern`), an option it
does not take (:class:`~attnzoo.AttentionInputError`, with the closest name), a model
whose masks it cannot take.

The sentences (:mod:`attnzoo.data.sentences`) ship with attnzoo; ``attnzoo convert MODEL
--method NAME`` (:mod:`attnzoo.bench.conversion`) converts and writes a fidelity and speed
report.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from . import registry
from .api import attention, build
from .errors import AttentionInputError, UnsupportedPattern, closest
from .integrations.hf import MODELS, resolve_model

__all__ = ["convert", "Conversion", "LayerRecord", "capture", "Captured", "MODELS", "resolve_model",
           "attention_weights", "row_kl", "mean_pooled", "DEFAULT_STEPS", "DEFAULT_LR"]

CAPTURE_KEY = "attnzoo:_capture"  # the private backend that records q, k, v and the mask

DEFAULT_STEPS = 300
DEFAULT_LR = 0.05

# ----------------------------------------------------------------------------- records


@dataclass
class LayerRecord:
    """One attention layer's conversion.

    Attributes:
        name: the attention module's path in the model (``encoder.layer.0.attention.self``).
        heads, kv_heads, head_dim: what the module was built with.
        fit: ``"distilled"`` (the weight cross-entropy), ``"k-means"`` (routing's centroids),
            ``"gate"`` (seer's gate), or ``"none"`` (no parameters, or ``steps=0``); with
            `` (no gain: initial parameters kept)`` appended when the fit did not lower its
            objective on the distillation texts (selective starts as exact softmax, where
            Adam's steps on near-zero gradients only move it away), so the initial
            parameters were restored.
        kl_before / kl_after: mean row ``KL(P || Â)`` on the distillation texts (nats), before
            and after fitting (None when not fitted).
        losses: the loss at every step. ``seconds``: fitting time of this layer.
    """

    name: str
    heads: int
    kv_heads: int
    head_dim: int
    fit: str = "none"
    kl_before: Optional[float] = None
    kl_after: Optional[float] = None
    losses: list = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Conversion:
    """What :func:`convert` did (``model.attnzoo_conversion``).

    Attributes:
        method, key: the method and the ``attn_implementation`` key the model now uses.
        options: the method's options (the module's constructor options for methods
            with parameters, else the functional options fixed in the key).
        layers: one :class:`LayerRecord` per attention layer, in the model's order.
        steps, lr, output_weight: the distillation settings. ``texts``, ``tokens``: how many
            distillation texts and real tokens were captured.
        seconds: wall time of the whole conversion (capture included); ``cpu_seconds``: the
            process's CPU time over it (all threads), which a busy machine does not inflate.
        distilled: whether any layer was fitted.
    """

    method: str
    key: str
    options: dict
    layers: list
    steps: int
    lr: float
    output_weight: float
    texts: int = 0
    tokens: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    distilled: bool = False

    def kl(self, when: str = "after") -> Optional[float]:
        """Mean over the layers of ``kl_after`` (or ``kl_before``), None if not fitted."""
        vals = [getattr(r, f"kl_{when}") for r in self.layers if getattr(r, f"kl_{when}") is not None]
        return sum(vals) / len(vals) if vals else None


# ----------------------------------------------------------------------------- capture


@dataclass
class Batch:
    """One layer's attention inputs for one batch: ``q (B, Hq, Nq, D)``, ``k``, ``v``;
    ``key_mask (B, Nk)`` (True = real key) or None; ``mask``: a dense bool mask when the
    model's is neither causal nor bidirectional with padding; ``causal``; ``scale``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_mask: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]
    causal: bool
    scale: Optional[float]

    def rows(self) -> torch.Tensor:
        """``(B, 1, Nq)`` bool: the query rows that count (real tokens)."""
        B, _, Nq, _ = self.q.shape
        if self.key_mask is not None and Nq == self.k.shape[2]:
            return self.key_mask[:, None, :]
        return torch.ones(B, 1, Nq, dtype=torch.bool, device=self.q.device)


@dataclass
class Captured:
    """The attention inputs of every attention module of a model on some inputs:
    ``layers`` maps the module's path to its list of :class:`Batch` (one per forward),
    in the order the model calls them; ``modules`` maps the path to the module."""

    layers: dict
    modules: dict
    texts: int = 0
    tokens: int = 0


def _capture_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, *, store: dict, **kwargs):
    """The capture backend: record the call, compute exact softmax (the original attention)."""
    from .integrations.hf import split_mask

    causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
    key_mask = mask = None
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
        found = split_mask(attention_mask, causal)
        if found is None and causal:
            found = split_mask(attention_mask, False)
        if found is None:
            mask, causal = attention_mask, False
        else:
            causal, key_mask = found
    elif attention_mask is not None:
        raise AttentionInputError("attnzoo.convert captures boolean attention masks only (SDPA's); this model "
                                  f"passes a {type(attention_mask).__name__} of dtype "
                                  f"{getattr(attention_mask, 'dtype', None)}")
    if query.shape[2] != key.shape[2] and causal:
        raise AttentionInputError("attnzoo.convert captures full forward passes: run it without a KV cache")
    options = {"softcap": kwargs["softcap"]} if kwargs.get("softcap") is not None else {}
    want = bool(kwargs.get("output_attentions"))
    res = attention(query, key, value, causal=causal, mask=mask, key_mask=key_mask, scale=scaling,
                    return_weights=want, **options)
    out, weights = res if want else (res, None)
    store["calls"].append((module, Batch(query.detach(), key.detach(), value.detach(), key_mask, mask, causal,
                                         scaling)))
    return out.transpose(1, 2).contiguous(), weights


def _register_capture(store: dict) -> str:
    import functools

    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    fn = functools.partial(_capture_forward, store=store)
    fn.__name__ = "attnzoo_capture"  # type: ignore[attr-defined]
    AttentionInterface.register(CAPTURE_KEY, fn)
    AttentionMaskInterface.register(CAPTURE_KEY, sdpa_mask)
    return CAPTURE_KEY


def _batches(texts, tokenizer, batch_size: int, max_length: int, device) -> list:
    """Model inputs for ``texts``, sorted by length (little padding) and batched."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = []
    for start in range(0, len(order), batch_size):
        chunk = [texts[i] for i in order[start:start + batch_size]]
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append({k: v.to(device) for k, v in enc.items()})
    return out


def _set_implementation(model, key: str) -> None:
    can = getattr(model, "_can_set_attn_implementation", None)
    if not hasattr(model, "set_attn_implementation") or (can is not None and not can()):
        raise AttentionInputError(f"{type(model).__name__} cannot switch its attention implementation (it does not "
                                  "use transformers' AttentionInterface), so attnzoo cannot convert it")
    model.set_attn_implementation(key)
    if getattr(model.config, "_attn_implementation", key) != key:
        raise AttentionInputError(f"{type(model).__name__} did not accept attn_implementation={key!r}")


def capture(model, inputs: Sequence[dict]) -> Captured:
    """Run ``model`` on each dict of ``inputs`` (model keyword arguments, e.g. a tokenizer's
    output) with the capture backend and return every attention layer's inputs. The model
    is in eval mode and its attention implementation is restored afterwards."""
    store: dict = {"calls": []}
    key = _register_capture(store)
    before = model.config._attn_implementation
    training = model.training
    layers: dict = {}
    modules: dict = {}
    names = {id(m): n for n, m in model.named_modules()}
    model.eval()
    tokens = texts = 0
    try:
        _set_implementation(model, key)
        with torch.no_grad():
            for batch in inputs:
                store["calls"].clear()
                model(**batch)
                mask = batch.get("attention_mask")
                texts += int(next(iter(batch.values())).shape[0])
                tokens += int(mask.sum()) if mask is not None else int(next(iter(batch.values())).numel())
                for module, rec in store["calls"]:
                    name = names.get(id(module), f"attention{len(modules)}")
                    modules.setdefault(name, module)
                    layers.setdefault(name, []).append(rec)
    finally:
        model.set_attn_implementation(before)
        model.train(training)
    if not layers:
        raise AttentionInputError(f"{type(model).__name__} made no call to transformers' attention interface, so "
                                  "attnzoo found no attention layer to convert")
    return Captured(layers, modules, texts, tokens)


# ----------------------------------------------------------------------------- weights and losses


def teacher(batch: Batch):
    """``(output, weights)`` of exact softmax on the batch (the original attention)."""
    return attention(batch.q.float(), batch.k.float(), batch.v.float(), causal=batch.causal, mask=batch.mask,
                     key_mask=batch.key_mask, scale=batch.scale, return_weights=True, impl="reference")


def _student(method: str, module, options: dict, batch: Batch, *, return_weights: bool, impl: Optional[str] = None):
    call = dict(causal=batch.causal, mask=batch.mask, key_mask=batch.key_mask, scale=batch.scale,
                return_weights=return_weights)
    q, k, v = batch.q.float(), batch.k.float(), batch.v.float()
    if module is not None:
        if impl is not None:
            call["impl"] = impl
        return module(q, k, v, **call)
    return registry.get(method)(q, k, v, impl=impl or "auto", **call, **options)


def attention_weights(method: str, batch: Batch, module=None, options: Optional[dict] = None) -> torch.Tensor:
    """The method's attention weights ``(B, Hq, Nq, Nk)`` on a captured batch (through
    ``module`` when given, else the functional form with ``options``)."""
    return _student(method, module, options or {}, batch, return_weights=True)[1]


def row_kl(target: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, eps: float = 1e-12):
    """``(sum, count)`` of the row ``KL(target || weights)`` over the rows where ``rows``
    (broadcastable to ``(B, H, Nq)``) is True."""
    t = target.float().clamp_min(0)
    kl = (t * (torch.log(t + eps) - torch.log(weights.float().clamp_min(0) + eps))).sum(-1)
    w = rows.to(kl.dtype).expand_as(kl)
    return (kl * w).sum(), int(w.sum())


def _row_mean(x, rows):
    w = rows.to(x.dtype).expand_as(x)
    return (x * w).sum() / w.sum().clamp_min(1)


def _cross_entropy(target, weights, rows, eps: float = 1e-12):
    return _row_mean(-(target * torch.log(weights.clamp_min(eps))).sum(-1), rows)


def _entropy(target, rows) -> torch.Tensor:
    return _row_mean(-(target * torch.log(target.clamp_min(1e-30))).sum(-1), rows)


def _output_error(out, target, rows):
    """``|Ô - O|² / |O|²`` over the real query rows (all heads)."""
    w = rows.to(out.dtype).expand(out.shape[:3])
    return ((out - target) ** 2).sum(-1).mul(w).sum() / (target ** 2).sum(-1).mul(w).sum().clamp_min(1e-12)


def mean_pooled(model, batch: dict) -> torch.Tensor:
    """Sentence-transformers' mean pooling of the last hidden state over the real tokens."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


# ----------------------------------------------------------------------------- fitting


def _fit_on(method, module, batches, targets, output_weight: float) -> tuple:
    """``(mean row KL, objective)`` on the captured batches; the objective adds the output
    error (weighted as in the distillation)."""
    total, count, err = 0.0, 0, 0.0
    with torch.no_grad():
        for b, (O, P) in zip(batches, targets):
            out, W = _student(method, module, {}, b, return_weights=True)
            s, n = row_kl(P, W, b.rows())
            total, count = total + float(s), count + n
            if output_weight:
                err += float(_output_error(out, O, b.rows())) / len(batches)
    kl = total / max(count, 1)
    return kl, kl + output_weight * err


def _distil(method, module, batches, targets, *, steps, lr, output_weight, seed, on_step):
    """Adam on the weight cross-entropy (+ output error), one captured batch per step."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    gen = torch.Generator().manual_seed(seed)
    entropies = [float(_entropy(P, b.rows())) for b, (_, P) in zip(batches, targets)]
    losses = []
    order: list = []
    for _ in range(steps):
        if not order:
            order = torch.randperm(len(batches), generator=gen).tolist()
        i = order.pop()
        b, (O, P) = batches[i], targets[i]
        opt.zero_grad()
        out, W = _student(method, module, {}, b, return_weights=True)
        loss = _cross_entropy(P, W, b.rows()) - entropies[i]  # = the mean row KL (the entropy is a constant)
        if output_weight:
            loss = loss + output_weight * _output_error(out, O, b.rows())
        if loss.requires_grad:
            loss.backward()
            opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        on_step()
    return losses


def _kmeans(module, batches, *, steps, on_step):
    """Routing's centroids: online k-means over the captured queries and real keys, with a
    faster moving average than the module's training default while it fits."""
    decay = module.decay
    module.decay = min(decay, 0.9)
    try:
        for i in range(steps):
            b = batches[i % len(batches)]
            module.update_centroids(b.q.float(), b.k.float(), key_mask=b.key_mask)
            on_step()
    finally:
        module.decay = decay
    return []


def _gate(module, batches, *, steps, lr, on_step):
    """Seer's gate: its own self-distillation (block-pooled attention targets), one captured
    batch at a time."""
    from .methods.sparse.seer import train_gate

    losses = []
    per = max(1, steps // len(batches))
    done = 0
    while done < steps:
        for b in batches:
            n = min(per, steps - done)
            if n <= 0:
                break
            res = train_gate(module, b.q, b.k, steps=n, lr=lr, causal=b.causal, key_mask=b.key_mask)
            losses += list(res["losses"])
            done += n
            for _ in range(n):
                on_step()
    return losses


def _fit_kind(spec, module) -> str:
    if module is None:
        return "none"
    if spec.name == "seer":
        return "gate"
    if hasattr(module, "update_centroids") and not any(p.requires_grad for p in module.parameters()):
        return "k-means"
    if any(p.requires_grad for p in module.parameters()):
        return "distilled"
    return "none"


# ----------------------------------------------------------------------------- options and checks


def _options_key(method: str, options: dict) -> str:
    if not options:
        return f"attnzoo:{method}"
    digest = hashlib.sha1(repr(sorted((k, repr(v)) for k, v in options.items())).encode()).hexdigest()[:10]
    return f"attnzoo:{method}-{digest}"


def _split_options(spec, options: dict) -> tuple:
    """``(constructor options, functional options)``, checked: a method with parameters
    takes only its module's constructor options."""
    options = dict(options or {})
    if spec.module is None:
        spec.resolve_options(options)  # the closest-name error for a misspelled option
        return {}, options
    ctor, rest = spec.split_module_options(options)
    fixed = {"heads", "kv_heads", "head_dim", "v_dim"} & set(options)
    if fixed:
        raise AttentionInputError(f"convert sets {', '.join(sorted(fixed))} from the model; do not pass them")
    if rest:
        import inspect

        takes = [n for n in inspect.signature(spec.module.__init__).parameters
                 if n not in ("self", "heads", "kv_heads", "head_dim", "v_dim")]
        unknown = [n for n in rest if n not in spec.options]
        if unknown:  # a misspelled name: the closest of the module's and the method's options
            raise AttentionInputError(
                f"method {spec.name!r} has no option {unknown[0]!r}.{closest(unknown[0], [*takes, *spec.options])} "
                f"Its module {spec.module.__name__} takes: {', '.join(takes) or 'none'}")
        raise AttentionInputError(
            f"method {spec.name!r} converts with its module {spec.module.__name__}, which takes the options "
            f"{', '.join(takes) or 'none'}; {', '.join(sorted(rest))} cannot be set on a converted model")
    return ctor, {}


def _check_pattern(spec, batch: Batch, name: str) -> None:
    cross = batch.q.shape[2] != batch.k.shape[2]
    pattern = registry.pattern_name(batch.causal, cross)
    if pattern not in spec.patterns:
        kind = "a causal (decoder)" if batch.causal else "a bidirectional (encoder)"
        raise UnsupportedPattern(
            f"method {spec.name!r} cannot convert this model: its attention ({name}) is {kind} {pattern} "
            f"attention, and {spec.name!r} supports only {', '.join(spec.patterns)}")
    if batch.mask is not None and not spec.masks:
        raise AttentionInputError(
            f"method {spec.name!r} cannot convert this model: its attention mask ({name}) is neither causal nor "
            "bidirectional with key padding, and the method takes no masks")
    if spec.query == "learned":
        raise UnsupportedPattern(
            f"method {spec.name!r} has one learned query per head (one output per key), not a query per token, "
            "so it cannot replace a pretrained model's attention")


def _default_tokenizer(model):
    from transformers import AutoTokenizer

    path = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not path:
        raise AttentionInputError("convert needs a tokenizer (tokenizer=...) or model inputs (inputs=...): the "
                                  "model does not say where it was loaded from")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # any loading failure: say what to pass
        raise AttentionInputError(f"convert could not load a tokenizer from {path!r} ({e}); pass tokenizer=...") from e


# ----------------------------------------------------------------------------- convert


def convert(model, method: str, *, texts: Optional[Sequence[str]] = None, tokenizer=None,
            inputs: Optional[Sequence[dict]] = None, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR,
            options: Optional[dict] = None, output_weight: float = 1.0, batch_size: int = 32,
            max_length: int = 128, seed: int = 0, progress: bool = True):
    """Swap every attention layer of a Hugging Face model for ``method``; distil its parameters.

    Args:
        model: a ``transformers`` ``PreTrainedModel`` that uses the AttentionInterface
            (BERT, Llama, Mistral, Qwen, ... ), converted in place.
        method: a registered method name (``attnzoo list``).
        texts: distillation sentences (default: :data:`attnzoo.data.sentences.TRAIN`).
        tokenizer: the model's tokenizer (default: loaded from where the model was loaded).
        inputs: instead of ``texts``: a sequence of dicts of model inputs (batches).
        steps: optimiser steps per layer (one captured batch per step); 0 swaps without
            fitting.
        lr: Adam's learning rate (cosine-annealed to 0 over ``steps``).
        options: the method's options; for methods with parameters, its module's
            constructor options (hedgehog: ``feature_dim``, ``activation``; agent:
            ``num_agents``, ...), else functional options fixed in the backend key.
        output_weight: weight of the attention-output error added to the weight
            cross-entropy (0: the paper's loss only).
        batch_size, max_length: how ``texts`` are tokenized.
        seed: the distillation's batch order and the modules' initialisation.
        progress: a rich progress bar while it fits.

    Returns:
        ``model``, converted, with ``model.attnzoo_conversion`` (a :class:`Conversion`).

    Raises:
        UnknownMethod: no method has that name.
        UnsupportedPattern: the method lacks the model's pattern (e.g. a causal-only method
            on an encoder).
        AttentionInputError: an option the method does not take, a mask it cannot take, or
            a model that cannot switch its attention.
    """
    from .integrations.hf import register_method

    started, cpu_started = time.perf_counter(), time.process_time()
    spec = registry.get(method)
    ctor, call_options = _split_options(spec, options)
    steps = int(steps)
    if steps < 0:
        raise AttentionInputError(f"steps must be >= 0, got {steps}")
    device = next(model.parameters()).device
    fit_wanted = spec.module is not None and steps > 0
    if inputs is None:
        if texts is None:
            from .data.sentences import TRAIN

            texts = TRAIN
        texts = [t for t in texts]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise AttentionInputError("texts must be a non-empty sequence of strings")
        tokenizer = tokenizer if tokenizer is not None else _default_tokenizer(model)
        if not fit_wanted:  # a probe: the patterns and shapes of the attention layers
            texts = texts[:2]
        inputs = _batches(texts, tokenizer, batch_size, max_length, device)
    elif not fit_wanted:
        inputs = list(inputs)[:1]
    captured = capture(model, inputs)
    for name, batches in captured.layers.items():
        _check_pattern(spec, batches[0], name)
    key = _options_key(method, call_options)
    register_method(method, key, **call_options)

    records, built = [], {}
    torch.manual_seed(seed)
    for name, batches in captured.layers.items():
        b0 = batches[0]
        heads, kv_heads, head_dim, v_dim = b0.q.shape[1], b0.k.shape[1], b0.q.shape[3], b0.v.shape[3]
        records.append(LayerRecord(name, heads, kv_heads, head_dim))
        if spec.module is not None:
            kw = dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, **ctor)
            if v_dim != head_dim:
                kw["v_dim"] = v_dim
            built[name] = build(method, **kw).to(device)

    total = steps * len(records) if fit_wanted else 0
    bar = _progress_bar(progress and total > 0, f"convert to {method}", total)
    with bar as (advance, describe):
        for rec in records:
            module = built.get(rec.name)
            kind = _fit_kind(spec, module) if fit_wanted else "none"
            rec.fit = kind
            if kind == "none":
                continue
            describe(f"{method}: {rec.name}")
            t0 = time.perf_counter()
            batches = captured.layers[rec.name]
            with torch.no_grad():
                targets = [tuple(t.float() for t in teacher(b)) for b in batches]
            module.eval()  # routing's module would move its centroids at every call in training mode
            weight = output_weight if kind == "distilled" else 0.0
            rec.kl_before, before = _fit_on(method, module, batches, targets, weight)
            initial = {n: t.detach().clone() for n, t in module.state_dict().items()}
            if kind == "distilled":
                rec.losses = _distil(method, module, batches, targets, steps=steps, lr=lr,
                                     output_weight=output_weight, seed=seed, on_step=advance)
            elif kind == "k-means":
                rec.losses = _kmeans(module, batches, steps=steps, on_step=advance)
            else:
                rec.losses = _gate(module, batches, steps=steps, lr=lr, on_step=advance)
            rec.kl_after, after = _fit_on(method, module, batches, targets, weight)
            if not after < before:  # e.g. selective starts as exact softmax: Adam's noise only moves it away
                module.load_state_dict(initial)
                rec.kl_after, rec.fit = rec.kl_before, kind + " (no gain: initial parameters kept)"
            rec.seconds = time.perf_counter() - t0
    n_texts, n_tokens = captured.texts, captured.tokens
    del captured  # the captured activations can be large

    # swap: the modules first (the backend reads them at every call), then the backend
    names = dict(model.named_modules())
    for rec in records:
        target = names[rec.name]
        module = built.get(rec.name)
        if module is not None:
            param = next(target.parameters(), None)
            target.attnzoo_module = module.to(dtype=param.dtype) if param is not None else module
            target.attnzoo_module.train(model.training)
        elif hasattr(target, "attnzoo_module"):
            del target.attnzoo_module
    _set_implementation(model, key)
    model.attnzoo_conversion = Conversion(
        method=method, key=key, options=dict(ctor or call_options), layers=records, steps=steps if fit_wanted else 0,
        lr=lr, output_weight=output_weight, texts=n_texts, tokens=n_tokens, seconds=time.perf_counter() - started,
        cpu_seconds=time.process_time() - cpu_started,
        distilled=any(r.fit != "none" for r in records))
    return model


class _progress_bar:
    """``with _progress_bar(on, description, total) as (advance, describe)``: rich, transient."""

    def __init__(self, on: bool, description: str, total: int):
        self.on, self.description, self.total = on, description, total
        self.progress = None

    def __enter__(self):
        if not self.on:
            return (lambda: None), (lambda d: None)
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(TextColumn("{task.description}", style="cyan"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=True)
        self.progress.__enter__()
        task = self.progress.add_task(self.description, total=self.total)
        return (lambda: self.progress.advance(task)), (lambda d: self.progress.update(task, description=d))

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False

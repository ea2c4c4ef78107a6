"""The quality half of the benchmark: train a small model per (task, setting, method),
report held-out accuracy, and CAB's compositional index across the tasks.

Tasks: the four CAB-pattern tasks of :mod:`attnzoo.bench.tasks.cab` (``classify``,
``copy``, ``reverse``, ``transduce``) and ``mqar`` (:mod:`attnzoo.bench.tasks.mqar`,
Zoology's multi-query associative recall: a causal LM, loss and accuracy only at the
query positions, swept over sequence length × number of key–value pairs), and ``corners``
(:mod:`attnzoo.bench.tasks.vision`, noncausal self on a 2-D image: do the marked pixels
in opposite corners share a colour; for the vision methods, in ``full.toml``'s list and
not in :data:`DEFAULT_TASKS`: ``--tasks corners`` elsewhere; default ``seq_len`` 256, a 16 × 16 grid). A method runs
a task when its spec lists the task's pattern; the other pairs are skipped
(:func:`unsupported_pairs` says which and why). The models are in
:mod:`attnzoo.bench.tasks.model` (two pre-norm blocks; the method's options for the
task length from each method's sizing hook, ``spec.sized_options(N)``).

Config: the ``[tasks]`` table of a benchmark TOML file (``benchmarks/quick.toml``,
``benchmarks/full.toml``, ``benchmarks/mqar-zoology.toml``)::

    [tasks]
    methods = "all"            # or a list of method names (read by the CLI)
    tasks = ["classify", "copy", "reverse", "transduce", "mqar"]
    workers = 2                # trainings in parallel, one process each (read by the CLI)
    threads = 1                # torch threads per worker (read by the CLI)
    timeout = 300              # seconds per training (read by the CLI)
    seed = 0                   # model initialisation and data (train and held-out sets)

    [tasks.model]              # defaults for every task (those of TaskCase)
    d_model = 32
    heads = 2
    layers = 2
    steps = 150
    batch_size = 32
    lr = 1e-2
    eval_examples = 256
    vocab_size = 16

    [tasks.classify]           # per task: seq_len (or seq_lens = [...]) and any model key
    seq_len = 32
    vocab_size = 20
    steps = 200

    [tasks.mqar]               # MQAR: the sweep seq_lens x num_kv_pairs (and model keys)
    seq_lens = [32]
    num_kv_pairs = [4]
    vocab_size = 32
    steps = 300

    [tasks.options.sliding_window]   # optional: method options over the sized ones
    window = 8

Every task table takes ``seq_len`` or ``seq_lens`` (a sweep) and overrides of the
``[tasks.model]`` keys; ``mqar`` also takes ``num_kv_pairs`` (int or list) and
``power_a`` (combinations with ``seq_len < 4 * num_kv_pairs`` are left out, as in
Zoology's sweeps); ``classify`` takes ``num_classes``. Unknown keys raise
:class:`~attnzoo.errors.AttentionInputError`. ``impl`` (optional, top level) trains every
method with that implementation instead of
:data:`~attnzoo.bench.tasks.model.TASK_IMPLS`' choice.

Training (:func:`run_task`): ``torch.manual_seed(case.seed)``, AdamW (β = 0.9, 0.98,
weight decay 0.01) with a linear warm-up over the first 10% of the steps and cosine
decay to 10% of ``lr``, gradients clipped at norm 1; every step draws a fresh batch
from the task's generator (train seeds never collide with the held-out seed), and the
held-out set of ``eval_examples`` is scored at the end. Deterministic for a given case
on a given machine and thread count.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from ... import registry
from ...errors import AttentionInputError
from ..results import as_list, jsonable
from .cab import IGNORE
from .cab import TASKS as CAB_TASKS
from .model import EncoderDecoder, SelfAttentionLM, task_impl, task_options
from .mqar import mqar
from .vision import VISION_TASKS

#: The tasks with a generator: CAB's four and the 2-D ``corners`` (:mod:`attnzoo.bench.tasks.vision`).
TASKS = {**CAB_TASKS, **VISION_TASKS}
#: Every task the suite knows, in report order, with its pattern.
TASK_PATTERNS = {**{name: spec.pattern for name, spec in TASKS.items()}, "mqar": "causal_self"}
DEFAULT_TASKS = ("classify", "copy", "reverse", "transduce", "mqar")

#: The ``[tasks.model]`` keys and their defaults (those of :class:`TaskCase`).
MODEL_KEYS = ("vocab_size", "d_model", "heads", "layers", "steps", "batch_size", "lr", "eval_examples")
#: Keys of the ``[tasks]`` table itself (the CLI reads methods/workers/threads/timeout).
TOP_KEYS = ("methods", "tasks", "workers", "threads", "timeout", "seed", "impl", "model", "options")

#: Data seeds: training step ``s`` draws with ``seed * _SEED_STRIDE + s + 1``, the held-out
#: set with ``seed * _SEED_STRIDE`` — never the same for fewer than a million steps.
_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class TaskCase:
    """One training: a task at one setting, with one method.

    ``setting``: extra generator arguments as sorted ``(name, value)`` pairs (MQAR:
    ``(("num_kv_pairs", 8),)``). ``options``: method options as ``(name, value)`` pairs,
    applied over :func:`~attnzoo.bench.tasks.model.task_options` (empty: those alone).
    """

    task: str
    method: str
    seq_len: int
    setting: tuple = ()
    vocab_size: int = 16
    d_model: int = 32
    heads: int = 2
    layers: int = 2
    steps: int = 150
    batch_size: int = 32
    lr: float = 1e-2
    eval_examples: int = 256
    seed: int = 0
    options: tuple = ()
    impl: str = "reference"

    @property
    def pattern(self) -> str:
        return TASK_PATTERNS[self.task]

    def key(self) -> str:
        """A stable string naming every field (the resume key)."""
        return json.dumps({f.name: jsonable(getattr(self, f.name)) for f in fields(self)}, sort_keys=True,
                          separators=(",", ":"))

    def method_options(self) -> dict:
        """The options the method runs with: its sizing hook's for this length, then ``options``."""
        return {**task_options(self.method, self.seq_len), **dict(self.options)}


# ------------------------------------------------------------------------------ config


def _as_list(v, name) -> list:
    out = as_list(v)
    if not out:
        raise AttentionInputError(f"[tasks] {name} must not be empty")
    return out


def _task_list(config: dict) -> list:
    tasks = _as_list(config.get("tasks", list(DEFAULT_TASKS)), "tasks")
    for t in tasks:
        if t not in TASK_PATTERNS:
            raise AttentionInputError(f"[tasks] unknown task {t!r}; known: {', '.join(TASK_PATTERNS)}")
    return list(dict.fromkeys(tasks))


def _check_keys(table: dict, allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise AttentionInputError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _task_settings(config: dict, task: str) -> tuple[list, list, dict]:
    """(seq_lens, settings, model keys) of one task from the config."""
    model = dict(config.get("model", {}))
    _check_keys(model, MODEL_KEYS, "[tasks.model]")
    table = dict(config.get(task, {}))
    extra = {"mqar": ("num_kv_pairs", "power_a"), "classify": ("num_classes",)}.get(task, ())
    _check_keys(table, ("seq_len", "seq_lens") + MODEL_KEYS + extra, f"[tasks.{task}]")
    if "seq_len" in table and "seq_lens" in table:
        raise AttentionInputError(f"[tasks.{task}]: give seq_len or seq_lens, not both")
    default_len = {"mqar": 64, "corners": 256}.get(task, 32)
    seq_lens = [int(n) for n in _as_list(table.pop("seq_lens", table.pop("seq_len", default_len)), "seq_lens")]
    settings = [()]
    if task == "mqar":
        pairs = [int(d) for d in _as_list(table.pop("num_kv_pairs", 4), "num_kv_pairs")]
        power = table.pop("power_a", None)
        settings = [(("num_kv_pairs", d),) + ((("power_a", float(power)),) if power is not None else ())
                    for d in pairs]
    elif task == "classify" and "num_classes" in table:
        settings = [(("num_classes", int(table.pop("num_classes"))),)]
    model.update(table)
    return seq_lens, settings, model


def _config_options(config: dict) -> dict:
    opts = config.get("options", {}) or {}
    if not isinstance(opts, dict):
        raise AttentionInputError("[tasks.options] must be a table of method -> {option = value}")
    out = {}
    for method, table in opts.items():
        registry.get(method)  # a misspelled method name raises, with a suggestion
        if not isinstance(table, dict):
            raise AttentionInputError(f"[tasks.options.{method}] must be a table of option = value")
        out[method] = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in table.items()))
    return out


def build_task_cases(config: dict, methods: list) -> list:
    """One :class:`TaskCase` per (task, model sweep, seq_len, setting, method) for the
    ``[tasks]`` table ``config``, skipping methods whose spec lacks the task's pattern
    (see :func:`unsupported_pairs`). A model key given as a list (e.g. ``d_model = [64,
    128]``) is swept. Order: task, model sweep, seq_len, setting, then method."""
    _check_keys(config, TOP_KEYS + tuple(TASK_PATTERNS), "[tasks]")
    seed = int(config.get("seed", 0))
    impl = config.get("impl")
    options = _config_options(config)
    specs = [registry.get(m) for m in methods]
    cases = []
    for task in _task_list(config):
        seq_lens, settings, model = _task_settings(config, task)
        for kwargs in _model_sweep(model):
            for n in seq_lens:
                for setting in settings:
                    if task == "mqar" and n < 4 * dict(setting)["num_kv_pairs"]:
                        continue  # MQAR needs seq_len >= 4 * num_kv_pairs (left out, as in Zoology's sweeps)
                    for spec in specs:
                        if TASK_PATTERNS[task] not in spec.patterns:
                            continue
                        cases.append(TaskCase(task=task, method=spec.name, seq_len=n, setting=setting, seed=seed,
                                              options=options.get(spec.name, ()), impl=impl or task_impl(spec.name),
                                              **kwargs))
    return cases


def _model_sweep(model: dict) -> list:
    """The model keyword sets of a task: the product over the keys given as lists."""
    floats = {f.name for f in fields(TaskCase) if f.type in ("float", float)}
    names = list(model)
    values = [[float(x) if k in floats else int(x) for x in _as_list(model[k], k)] for k in names]
    return [dict(zip(names, combo)) for combo in itertools.product(*values)]


def unsupported_pairs(config: dict, methods: list) -> list:
    """``[(method, task, reason)]`` for the pairs :func:`build_task_cases` skips."""
    out = []
    for task in _task_list(config):
        pattern = TASK_PATTERNS[task]
        for m in methods:
            spec = registry.get(m)
            if pattern not in spec.patterns:
                reason = (f"{spec.name} does not support the {pattern} pattern that {task} needs "
                          f"(it supports: {', '.join(spec.patterns)})")
                out.append((spec.name, task, reason))
    return out


# ------------------------------------------------------------------------------ training


def _make(case: TaskCase, num: int, seed: int) -> dict:
    if case.task == "mqar":
        s = dict(case.setting)
        inputs, targets = mqar(num, case.seq_len, s["num_kv_pairs"], case.vocab_size,
                               power_a=s.get("power_a", 0.01), seed=seed, ignore_index=IGNORE)
        return {"inputs": inputs, "targets": targets}
    return TASKS[case.task].make(num, case.seq_len, case.vocab_size, seed=seed, **dict(case.setting))


def chance(case: TaskCase) -> float:
    """Accuracy of guessing. MQAR: ``1 / (vocab_size - vocab_size // 2)`` (values are the upper half)."""
    if case.task == "mqar":
        return 1.0 / (case.vocab_size - case.vocab_size // 2)
    return float(TASKS[case.task].chance(case.vocab_size, **dict(case.setting)))


def build_model(case: TaskCase) -> torch.nn.Module:
    """The model ``case`` trains (see :mod:`attnzoo.bench.tasks.model`)."""
    opts = case.method_options()
    kw = {"method": case.method, "dim": case.d_model, "heads": case.heads, "layers": case.layers, "impl": case.impl,
          "options": opts}
    pattern = case.pattern
    if pattern.endswith("_cross"):
        return EncoderDecoder(case.vocab_size, case.seq_len, case.vocab_size, causal=pattern == "causal_cross", **kw)
    out_dim = dict(case.setting).get("num_classes", 4) if case.task == "classify" else case.vocab_size
    return SelfAttentionLM(case.vocab_size, case.seq_len, out_dim, causal=pattern == "causal_self", rotary=True, **kw)


def _forward(model, case: TaskCase, batch: dict):
    """(logits (M, C), targets (M,)) over the scored positions."""
    if "source" in batch:
        logits = model(batch["source"])
        targets = batch["targets"]
    else:
        logits = model(batch["inputs"])
        targets = batch.get("targets")
        if "labels" in batch:  # one label per example, read at position 0 (classify, corners)
            return logits[:, 0], batch["labels"]
    return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)


def _lr_at(step: int, steps: int, lr: float) -> float:
    warm = max(1, steps // 10)
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def evaluate(model, case: TaskCase, data: dict) -> tuple[float, float]:
    """(accuracy, mean loss) over the scored positions of ``data``, in batches."""
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    n = next(iter(data.values())).shape[0]
    with torch.no_grad():
        for i in range(0, n, case.batch_size):
            batch = {k: v[i:i + case.batch_size] for k, v in data.items()}
            logits, targets = _forward(model, case, batch)
            keep = targets != IGNORE
            logits, targets = logits[keep], targets[keep]
            loss_sum += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
            correct += int((logits.argmax(-1) == targets).sum())
            total += int(targets.numel())
    model.train()
    if total == 0:
        raise AttentionInputError(f"{case.task}: the held-out set has no scored positions")
    return correct / total, loss_sum / total


def train_model(model, case: TaskCase) -> list:
    """Train ``model`` on ``case``'s task as every case is trained (AdamW, the warm-up +
    cosine schedule of :func:`_lr_at`, gradient clipping at 1, a fresh seeded batch per
    step); returns the training losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=case.lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    losses = []
    for step in range(case.steps):
        batch = _make(case, case.batch_size, case.seed * _SEED_STRIDE + step + 1)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, case.steps, case.lr)
        logits, targets = _forward(model, case, batch)
        loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def run_task(case: TaskCase) -> dict:
    """Train ``case``'s model and score it on a held-out set.

    Returns ``{"accuracy", "loss" (held-out cross-entropy per scored position), "chance",
    "train_s", "steps", "params", "pattern", "train_loss" (mean of the last 10% of the
    steps), "options" (the method options used)}``, all JSON-serialisable. A method that
    fails raises :class:`RuntimeError` naming the case, chained to the cause.
    """
    if case.task not in TASK_PATTERNS:
        raise AttentionInputError(f"unknown task {case.task!r}; known: {', '.join(TASK_PATTERNS)}")
    spec = registry.get(case.method)
    if case.pattern not in spec.patterns:
        raise AttentionInputError(f"method {case.method!r} does not support the {case.pattern} pattern of {case.task}")
    torch.manual_seed(case.seed)
    try:
        eval_data = _make(case, case.eval_examples, case.seed * _SEED_STRIDE)
        model = build_model(case)
        params = sum(p.numel() for p in model.parameters())
        t0 = time.perf_counter()
        losses = train_model(model, case)
        train_s = time.perf_counter() - t0
        accuracy, eval_loss = evaluate(model, case, eval_data)
    except Exception as e:
        raise RuntimeError(f"{case.task} with method {case.method!r} failed "
                           f"(seq_len={case.seq_len}, setting={dict(case.setting)}): {type(e).__name__}: {e}") from e
    tail = losses[-max(1, len(losses) // 10):] if losses else [float("nan")]
    return {"accuracy": accuracy, "loss": eval_loss if math.isfinite(eval_loss) else None, "chance": chance(case),
            "train_s": train_s, "steps": case.steps, "params": params, "pattern": case.pattern,
            "train_loss": statistics.fmean(tail) if all(math.isfinite(x) for x in tail) else None,
            "options": jsonable(case.method_options())}


# ------------------------------------------------------------------------------ scores


def task_scores(records: list) -> dict:
    """``{task: {method: accuracy}}`` from result records: the mean accuracy of the
    method's records of that task, so a task swept over settings or lengths (MQAR)
    counts once. A run that failed (error, timeout, out of memory) counts at its
    chance accuracy, so failing the hard settings never raises a method's mean."""
    acc: dict = {}
    for r in records:
        if r.get("status") == "ok" and r.get("accuracy") is not None:
            value = float(r["accuracy"])
        elif r.get("status") in ("error", "timeout", "oom") and r.get("chance") is not None:
            value = float(r["chance"])
        else:
            continue
        acc.setdefault(r["task"], {}).setdefault(r["method"], []).append(value)
    return {t: {m: statistics.fmean(v) for m, v in ms.items()} for t, ms in acc.items()}


def compositional_index(records: list) -> dict:
    """CAB's compositional index (CI) of every method over the tasks it ran.

    Per task, each method's accuracy (the mean over the task's settings — MQAR's
    seq_len × num_kv_pairs sweep counts as one task; see :func:`task_scores`) is
    normalised across the methods that ran it, ``z = (x - mean) / std`` (population
    std; ``z = 0`` when all methods tie or only one ran it), and a method's CI is the
    mean of its ``z`` over the tasks it ran. Failed runs count at chance accuracy.

    [J] Our reading of CAB ("CAB: Comprehensive Attention Benchmarking on Long Sequence
    Modeling", Zhang et al., 2023): CAB normalises each task's metric across the
    compared attentions and averages the normalised scores into one index per method;
    the z-score and the plain mean over the tasks a method ran are our choice (a method
    that lacks a pattern is scored on the tasks it can run, not penalised for the rest).
    """
    scores = task_scores(records)
    z: dict = {}
    for by_method in scores.values():
        vals = list(by_method.values())
        mean = statistics.fmean(vals)
        std = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        for m, x in by_method.items():
            z.setdefault(m, []).append((x - mean) / std if std > 1e-12 else 0.0)
    return {m: statistics.fmean(v) for m, v in sorted(z.items())}

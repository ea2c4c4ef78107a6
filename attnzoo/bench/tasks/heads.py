"""Mixture-of-Head attention in the benchmark's task models: the same task, the same
model, the same seed, trained once with full multi-head attention and once with MoH
routing its heads — how "MoH: Multi-Head Attention as Mixture-of-Head Attention"
claims that «50%-90% of the attention heads» suffice is checked on a CAB-pattern task.

The hook is the smallest there is: :func:`use_moh` replaces every
:class:`~attnzoo.layers.Attention` inside a built model by an
:class:`~attnzoo.layers.MoHAttention` over it (same projections, same method, a new
router), and :func:`moh_models` makes :func:`attnzoo.bench.tasks.suite.run_task`
build its models that way, so the training loop, data, schedule and scoring are the
suite's own. The routers are created after the model, so the MoH model starts from
exactly the weights of the multi-head one; MoH's load-balance loss is attached by the
layer itself (``balance_weight``), so the loop needs no change.

    python -m attnzoo.bench.tasks.heads --task copy --heads 4 --shared-heads 1 --top-k 1

trains ``copy`` (causal self-attention) with 4-head softmax attention and with MoH
using 1 shared + the top 1 of 3 routed heads per token (50 % of the heads), at the
quick config's settings (``benchmarks/quick.toml``), and prints both accuracies and the
fraction of heads MoH used (measured through :func:`attnzoo.stats.collect`).
"""

from __future__ import annotations

import argparse
import json
import statistics
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

import torch
from torch import nn

from ... import stats
from ...errors import AttentionInputError
from ...layers import Attention, MoHAttention
from . import suite


def use_moh(model: nn.Module, **moh_options) -> nn.Module:
    """Replace, in place, every :class:`Attention` of ``model`` by
    ``MoHAttention.from_attention(attention, **moh_options)``; returns ``model``."""
    targets = []
    for module in model.modules():
        if isinstance(module, MoHAttention):
            continue
        for name, child in module.named_children():
            if isinstance(child, Attention) and not isinstance(module, MoHAttention):
                targets.append((module, name, child))
    if not targets:
        raise AttentionInputError(f"{type(model).__name__} has no Attention layer to route")
    for module, name, child in targets:
        setattr(module, name, MoHAttention.from_attention(child, **moh_options))
    return model


@contextmanager
def moh_models(**moh_options) -> Iterator[None]:
    """Inside the block, :func:`~attnzoo.bench.tasks.suite.run_task` trains models whose
    attention layers are MoH layers (:func:`use_moh`)."""
    original = suite.build_model
    suite.build_model = lambda case: use_moh(original(case), **moh_options)
    try:
        yield
    finally:
        suite.build_model = original


def run_moh_task(case: suite.TaskCase, **moh_options) -> dict:
    """:func:`~attnzoo.bench.tasks.suite.run_task` with MoH layers; the record gains
    ``heads_used`` and ``heads_computed`` (means over every forward of the run)."""
    with moh_models(**moh_options), stats.collect() as record:
        result = suite.run_task(case)
    result["heads_used"] = statistics.fmean(record["heads_used"])
    result["heads_computed"] = statistics.fmean(record["heads_computed"])
    result["moh"] = dict(moh_options)
    return result


def quick_case(task: str, method: str = "softmax", config: str = "quick", **overrides) -> suite.TaskCase:
    """The :class:`~attnzoo.bench.tasks.suite.TaskCase` of ``task`` in a benchmark config
    (default ``benchmarks/quick.toml``), with field overrides (e.g. ``heads=4``)."""
    from ..results import load_config

    table = dict(load_config(config)[0].get("tasks", {}))
    table["tasks"] = [task]
    cases = suite.build_task_cases(table, [method])
    if not cases:
        raise AttentionInputError(f"config {config!r} builds no case of task {task!r} for method {method!r}")
    return replace(cases[0], **overrides)


def compare(case: suite.TaskCase, **moh_options) -> dict:
    """``{"mha": record, "moh": record}``: ``case`` trained with its multi-head attention,
    then with MoH over it (same seed, data and initial weights)."""
    return {"mha": suite.run_task(case), "moh": run_moh_task(case, **moh_options)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m attnzoo.bench.tasks.heads", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="copy", choices=list(suite.TASK_PATTERNS))
    p.add_argument("--method", default="softmax")
    p.add_argument("--config", default="quick")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--shared-heads", type=int, default=1)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--balance-weight", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the suite's trainings use 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {"heads": args.heads, "seed": args.seed}
    if args.steps is not None:
        overrides["steps"] = args.steps
    case = quick_case(args.task, args.method, args.config, **overrides)
    result = compare(case, shared_heads=args.shared_heads, top_k=args.top_k, balance_weight=args.balance_weight)
    mha, moh = result["mha"], result["moh"]
    for r in (mha, moh):
        r["loss"] = float("nan") if r["loss"] is None else r["loss"]  # a diverged run records None
    print(f"{case.task} ({case.pattern}), {case.method}, d_model={case.d_model}, heads={case.heads}, "
          f"layers={case.layers}, steps={case.steps}, seq_len={case.seq_len}, seed={case.seed}")
    print(f"  multi-head attention        accuracy {mha['accuracy']:.4f}  loss {mha['loss']:.4f}  "
          f"train {mha['train_s']:.1f} s  params {mha['params']}")
    print(f"  MoH {args.shared_heads} shared + top-{args.top_k} of {case.heads - args.shared_heads} routed  "
          f"accuracy {moh['accuracy']:.4f}  loss {moh['loss']:.4f}  train {moh['train_s']:.1f} s  "
          f"params {moh['params']}  heads used {moh['heads_used']:.3f}")
    print(f"  chance {mha['chance']:.4f}")
    print(json.dumps({"case": case.key(), "mha_accuracy": mha["accuracy"], "moh_accuracy": moh["accuracy"],
                      "heads_used": moh["heads_used"]}))
    return result


if __name__ == "__main__":
    main()

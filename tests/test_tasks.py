"""The quality-task library: CAB-pattern generators checked by brute force, the suite's
cases, a few tiny trainings, and CAB's compositional index by hand."""

import json
import math

import pytest
import torch

from attnzoo import registry
from attnzoo.bench.tasks import cab
from attnzoo.bench.tasks.cab import IGNORE, TASKS
from attnzoo.bench.tasks.model import task_options
from attnzoo.methods.sparse.block_sparse import FixedLayout
from attnzoo.bench.tasks.suite import (
    TaskCase,
    build_task_cases,
    compositional_index,
    run_task,
    task_scores,
    unsupported_pairs,
)
from attnzoo.errors import AttentionInputError

# ------------------------------------------------------------------ generators, brute force


@pytest.mark.parametrize("seq_len,vocab,classes", [(12, 20, 4), (7, 10, 4), (30, 33, 2), (2, 6, 2)])
def test_classify_label_is_the_value_under_the_query_key(seq_len, vocab, classes):
    d = cab.classify(40, seq_len, vocab, seed=3, num_classes=classes)
    x, y = d["inputs"].tolist(), d["labels"].tolist()
    K = vocab // (classes + 1)
    for row, label in zip(x, y):
        assert len(row) == seq_len
        q = row[0]
        assert 0 <= q < K
        hits = []
        for j in range(1, seq_len):
            t = row[j]
            assert K <= t < K + K * classes, "positions 1.. hold items"
            key, value = divmod(t - K, classes)
            if key == q:
                hits.append(value)
        assert hits == [label], "exactly one item carries the query key, and the label is its value"


def test_classify_labels_are_spread():
    y = cab.classify(2000, 16, 20, seed=0)["labels"]
    counts = torch.bincount(y, minlength=4).float() / 2000
    assert (counts - 0.25).abs().max() < 0.05


@pytest.mark.parametrize("seq_len", [2, 9, 16, 33])
def test_copy_second_half_repeats_the_first(seq_len):
    d = cab.copy(10, seq_len, 16, seed=1)
    x, t = d["inputs"].tolist(), d["targets"].tolist()
    L = seq_len // 2
    off = seq_len % 2  # odd lengths start with a separator
    for row, tgt in zip(x, t):
        assert len(row) == len(tgt) == seq_len
        if off:
            assert row[0] == 0
        seg = row[off:off + L]
        assert all(1 <= s < 16 for s in seg)
        assert row[off + L] == 0, "separator after the segment"
        assert row[off + L + 1:] == seg[:L - 1], "the copy repeats the segment"
        for i in range(seq_len):
            if i < off + L:
                assert tgt[i] == IGNORE, "no loss before the copy"
            else:
                assert tgt[i] == seg[i - off - L], "the target is the next token of the copy"
        # targets are the next input token wherever both exist
        for i in range(off + L, seq_len - 1):
            assert tgt[i] == row[i + 1]


def test_reverse_targets_are_the_source_flipped():
    d = cab.reverse(8, 13, 16, seed=2)
    for src, tgt in zip(d["source"].tolist(), d["targets"].tolist()):
        assert tgt == [src[13 - 1 - i] for i in range(13)]
        assert all(0 <= s < 16 for s in src)


def test_transduce_targets_use_only_the_past():
    d = cab.transduce(6, 11, 16, seed=4)
    src, tgt = d["source"], d["targets"]
    for s, t in zip(src.tolist(), tgt.tolist()):
        assert t == [s[i // 2] for i in range(11)]
    assert torch.equal(cab.transduce_targets(src), tgt)
    # perturbing the inputs after position i leaves targets 0..i unchanged
    g = torch.Generator().manual_seed(0)
    for i in range(11):
        pert = src.clone()
        pert[:, i + 1:] = torch.randint(0, 16, pert[:, i + 1:].shape, generator=g)
        assert torch.equal(cab.transduce_targets(pert)[:, : i + 1], tgt[:, : i + 1])
    # ... while reverse's first target depends on the last input (it needs the future)
    pert = src.clone()
    pert[:, -1] = (pert[:, -1] + 1) % 16
    assert not torch.equal(cab.reverse_targets(pert)[:, 0], cab.reverse_targets(src)[:, 0])


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generators_are_deterministic_in_the_seed(name):
    make = TASKS[name].make
    a, b, c = make(5, 16, 20, seed=7), make(5, 16, 20, seed=7), make(5, 16, 20, seed=8)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert all(v.dtype == torch.long for v in a.values())


def test_task_specs():
    assert {n: s.pattern for n, s in TASKS.items()} == {
        "classify": "noncausal_self", "copy": "causal_self", "reverse": "noncausal_cross", "transduce": "causal_cross"}
    assert TASKS["classify"].chance(20) == 0.25 and TASKS["classify"].chance(20, num_classes=2) == 0.5
    assert TASKS["reverse"].chance(16) == 1 / 16 and TASKS["copy"].chance(16) == 1 / 15
    with pytest.raises(AttentionInputError):
        cab.classify(2, 8, 9)  # vocab too small for 4 classes and 2 keys


# ------------------------------------------------------------------ options and cases


def test_task_options_are_valid_for_every_method():
    """Every method's sizing hook gives options it takes (its module's constructor takes
    them, for learnable methods), and the models build with them."""
    for spec in registry.list_methods():
        for n in (32, 256):
            opts = task_options(spec.name, n)
            if spec.module is None:
                spec.resolve_options(opts)  # valid option names and values
                assert set(opts) <= set(spec.options), (spec.name, opts)
            else:
                assert set(opts) <= set(spec.split_module_options(opts)[0]), (spec.name, opts)
    assert task_options("softmax", 32) == {}
    local = task_options("sliding_window", 32)
    assert local["window"] == 8, "a short task must make a window method really local"
    lay = FixedLayout(1, 4)(2, 8, 8)
    assert lay.shape == (1, 8, 8) and lay[0].diagonal().all() and lay[0, :, 3].all() and not lay[0, 0, 2]


CONFIG = {
    "tasks": ["classify", "mqar", "reverse"],
    "model": {"d_model": 16, "heads": 2, "steps": 3},
    "classify": {"seq_len": 16, "vocab_size": 20},
    "reverse": {"seq_lens": [8, 16], "steps": 5},
    "mqar": {"seq_lens": [16, 32], "num_kv_pairs": [2, 8], "vocab_size": 32},
}


def test_build_task_cases_skips_methods_lacking_the_pattern():
    methods = ["softmax", "aaren", "landmark", "agent"]
    cases = build_task_cases(CONFIG, methods)
    got = {(c.task, c.method) for c in cases}
    assert ("mqar", "aaren") in got and ("classify", "aaren") not in got and ("reverse", "aaren") not in got
    assert ("reverse", "landmark") not in got and ("classify", "landmark") in got
    assert ("mqar", "agent") not in got and ("reverse", "agent") in got
    skipped = {(m, t) for m, t, _ in unsupported_pairs(CONFIG, methods)}
    assert skipped == {("aaren", "classify"), ("aaren", "reverse"), ("landmark", "reverse"), ("agent", "mqar")}
    assert all(c.pattern in registry.get(c.method).patterns for c in cases)
    # mqar: seq_len 16 with 8 pairs is left out (seq_len < 4 * pairs)
    mq = {(c.seq_len, dict(c.setting)["num_kv_pairs"]) for c in cases if c.task == "mqar" and c.method == "softmax"}
    assert mq == {(16, 2), (32, 2), (32, 8)}
    rev = [c for c in cases if c.task == "reverse" and c.method == "softmax"]
    assert sorted(c.seq_len for c in rev) == [8, 16] and all(c.steps == 5 and c.d_model == 16 for c in rev)
    cls = [c for c in cases if c.task == "classify"]
    assert all(c.vocab_size == 20 and c.steps == 3 for c in cls)
    # keys: unique, stable, every field in them
    keys = [c.key() for c in cases]
    assert len(set(keys)) == len(keys)
    assert build_task_cases(CONFIG, methods)[0].key() == keys[0]
    k = json.loads(keys[0])
    assert set(k) == set(TaskCase.__dataclass_fields__)


def test_case_key_covers_every_field():
    base = TaskCase("copy", "softmax", 32)
    changed = [TaskCase("copy", "softmax", 32, **{f: v}) for f, v in [
        ("setting", (("x", 1),)), ("vocab_size", 17), ("d_model", 48), ("heads", 4), ("layers", 3), ("steps", 7),
        ("batch_size", 5), ("lr", 0.5), ("eval_examples", 9), ("seed", 1), ("options", (("window", 3),)),
        ("impl", "auto")]]
    keys = {base.key()} | {c.key() for c in changed}
    assert len(keys) == len(changed) + 1
    assert TaskCase("mqar", "softmax", 32).pattern == "causal_self"


def test_config_errors():
    with pytest.raises(AttentionInputError, match="unknown task"):
        build_task_cases({"tasks": ["sort"]}, ["softmax"])
    with pytest.raises(AttentionInputError, match="unknown key"):
        build_task_cases({"tasks": ["copy"], "copy": {"seqlen": 3}}, ["softmax"])
    with pytest.raises(AttentionInputError, match="unknown key"):
        build_task_cases({"tasks": ["copy"], "model": {"dmodel": 3}}, ["softmax"])


def test_config_options_override():
    cfg = {"tasks": ["copy"], "options": {"sliding_window": {"window": 5}}}
    (case,) = build_task_cases(cfg, ["sliding_window"])
    assert case.options == (("window", 5),) and case.method_options()["window"] == 5


# ------------------------------------------------------------------ training

TINY = {"vocab_size": 12, "d_model": 16, "heads": 2, "steps": 4, "batch_size": 8, "eval_examples": 16}


@pytest.mark.parametrize("task,method,setting", [
    ("copy", "softmax", ()),
    ("mqar", "linear", (("num_kv_pairs", 2),)),
    ("classify", "linear", ()),
    ("reverse", "softmax", ()),
    ("transduce", "linear", ()),
    ("mqar", "aaren", (("num_kv_pairs", 2),)),  # ignores queries: must run all the same
])
def test_run_task_tiny(task, method, setting):
    case = TaskCase(task, method, 16, setting=setting, **TINY)
    out = run_task(case)
    assert set(out) >= {"accuracy", "loss", "chance", "train_s", "steps", "params", "pattern"}
    assert 0.0 <= out["accuracy"] <= 1.0 and math.isfinite(out["loss"]) and out["loss"] > 0
    assert 0 < out["chance"] < 1 and out["steps"] == 4 and out["params"] > 0 and out["train_s"] >= 0
    assert out["pattern"] == case.pattern
    json.dumps(out)
    again = run_task(case)
    assert again["accuracy"] == out["accuracy"] and again["loss"] == out["loss"], "deterministic"


@pytest.mark.slow
def test_run_task_learns_copy():
    out = run_task(TaskCase("copy", "softmax", 8, vocab_size=6, d_model=16, heads=2, steps=60, batch_size=16,
                            eval_examples=32, lr=1e-2))
    assert out["accuracy"] > 0.6 > out["chance"]


@pytest.mark.slow
def test_quick_config_tasks_are_learnt_by_softmax_and_not_by_a_short_window():
    """The quick settings say something: exact attention learns both quick tasks (CAB's
    classify and MQAR), and a sliding window of N/4 — which cannot see the lookups — stays
    far below on the long-range classify task."""
    from attnzoo.bench.results import load_config

    table = load_config("quick")[0]["tasks"]
    cases = build_task_cases(table, ["softmax"])
    assert {c.task for c in cases} == {"classify", "mqar"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the benchmark's workers run them (and deterministic)
    try:
        for case in cases:
            out = run_task(case)
            assert out["accuracy"] > 0.9, (case.task, out)
        classify = next(c for c in build_task_cases(table, ["sliding_window"]) if c.task == "classify")
        assert run_task(classify)["accuracy"] < 0.6
    finally:
        torch.set_num_threads(threads)


def test_run_task_errors_name_the_case():
    with pytest.raises(AttentionInputError):
        run_task(TaskCase("copy", "agent", 16, **TINY))  # agent has no causal pattern
    with pytest.raises(RuntimeError, match="sliding_window"):
        run_task(TaskCase("copy", "sliding_window", 16, options=(("window", -3),), **TINY))


# ------------------------------------------------------------------ compositional index


def test_compositional_index_by_hand():
    recs = [
        # task A: a=1.0, b=0.5, c=0.0 -> mean 0.5, population std sqrt(1/6)
        {"task": "A", "method": "a", "status": "ok", "accuracy": 1.0},
        {"task": "A", "method": "b", "status": "ok", "accuracy": 0.5},
        {"task": "A", "method": "c", "status": "ok", "accuracy": 0.0},
        # mqar: a = mean(0.8, 0.4) = 0.6, b = 0.2 -> mean 0.4, std 0.2 -> z = +1, -1
        {"task": "mqar", "method": "a", "status": "ok", "accuracy": 0.8, "setting": {"num_kv_pairs": 4}},
        {"task": "mqar", "method": "a", "status": "ok", "accuracy": 0.4, "setting": {"num_kv_pairs": 8}},
        {"task": "mqar", "method": "b", "status": "ok", "accuracy": 0.2, "setting": {"num_kv_pairs": 4}},
        {"task": "mqar", "method": "c", "status": "error", "accuracy": None, "setting": {"num_kv_pairs": 4}},
        {"task": "mqar", "method": "c", "status": "timeout", "accuracy": 0.9, "setting": {"num_kv_pairs": 8}},
    ]
    z = 0.5 / math.sqrt(1 / 6)
    ci = compositional_index(recs)
    assert ci.keys() == {"a", "b", "c"}
    assert ci["a"] == pytest.approx((z + 1) / 2)
    assert ci["b"] == pytest.approx((0 - 1) / 2)
    assert ci["c"] == pytest.approx(-z)  # only task A counts for c
    assert task_scores(recs)["mqar"] == pytest.approx({"a": 0.6, "b": 0.2})
    # all tied / a single method: z = 0
    assert compositional_index([{"task": "A", "method": "a", "status": "ok", "accuracy": 0.3}]) == {"a": 0.0}
    assert compositional_index([]) == {}


def test_model_keys_given_as_lists_are_swept():
    cfg = {"tasks": ["mqar"], "model": {"d_model": [16, 32], "lr": [1e-3]},
           "mqar": {"seq_lens": [64], "num_kv_pairs": [4, 8]}}
    cases = build_task_cases(cfg, ["softmax"])
    assert sorted((c.d_model, dict(c.setting)["num_kv_pairs"]) for c in cases) == [(16, 4), (16, 8), (32, 4), (32, 8)]
    assert all(c.lr == 1e-3 and isinstance(c.lr, float) and c.impl == "sdpa" for c in cases)

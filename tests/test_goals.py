"""`attnzoo bench goals`: the shipped goals config is valid and every contender in it
runs; the peers compute what they claim (checked against independent truth); a row's
verdict follows its goal. No timing is asserted: the figures are the benchmark's."""

from pathlib import Path

import pytest
import torch

from attnzoo import registry
from attnzoo.bench import goals
from attnzoo.errors import AttentionInputError

CONFIG = Path(__file__).resolve().parents[1] / "benchmarks" / "perf-goals.toml"
ROWS = goals.load_rows(CONFIG)


@pytest.mark.parametrize("row", ROWS, ids=[r["name"][:60] for r in ROWS])
def test_every_shipped_row_is_well_formed_and_its_contenders_run(row):
    row = {**goals.DEFAULTS, **row, "heads": 2, "head_dim": 8}
    assert row["kind"] in ("ratio", "gflops", "scaling", "fresh", "error")
    op, value = row["goal"].split()
    assert op in ("<=", ">=") and float(value) > 0
    for side in ("a", "b"):
        c = row.get(side)
        if c is None:
            continue
        if "peer" not in c:
            registry.get(c["method"]).resolve_options(dict(c.get("options", {})))
        if c.get("peer") == "flex":
            continue  # compiled FlexAttention: 10-15 s per shape; exercised by the benchmark itself
        goals.make_contender(row, {**c, "cached": 64} if c.get("mode") == "decode" else c, 128)()


def test_fla_naive_chunk_equals_causal_linear_attention_in_float64():
    q, k, v = (torch.randn(1, 2, 256, 8, dtype=torch.float64) for _ in range(3))
    scores = (q @ k.transpose(-1, -2)).tril()  # identity feature map, no normaliser
    assert torch.allclose(goals.fla_naive_chunk(q, k, v, chunk=64), scores @ v, atol=1e-10)


def test_error_row_measures_against_float64_truth():
    row = {"name": "softmax / sdpa error", "kind": "error", "goal": "<= 4", "N": 256, "heads": 2, "head_dim": 16,
           "a": {"method": "softmax"}, "b": {"peer": "sdpa"}}
    out = goals.measure_row(row)
    (d,) = out["details"]
    assert 0 < d["a_err"] < 1e-5 and 0 < d["b_err"] < 1e-5
    assert out["figures"] == [d["a_err"] / d["b_err"]]
    assert out["holds"] == (out["figures"][0] <= 4)


def test_ratio_row_verdict_follows_its_goal():
    base = {"name": "softmax / sdpa", "kind": "ratio", "N": 64, "heads": 2, "head_dim": 8, "rounds": 2,
            "a": {"method": "softmax"}, "b": {"peer": "sdpa"}}
    never = goals.measure_row({**base, "goal": "<= 0.0000001"})
    always = goals.measure_row({**base, "goal": "<= 1000000"})
    assert len(never["figures"]) == 1 and never["figures"][0] > 0
    assert not never["holds"] and always["holds"]


def test_unknown_kind_and_peer_are_named():
    with pytest.raises(AttentionInputError, match="unknown kind 'speed'"):
        goals.measure_row({"name": "x", "kind": "speed", "goal": "<= 1", "a": {"method": "softmax"}})
    with pytest.raises(AttentionInputError, match="unknown peer 'xformers'"):
        goals.make_contender({**goals.DEFAULTS}, {"peer": "xformers"}, 16)


def test_a_failing_row_is_recorded_and_the_others_go_on(tmp_path):
    cfg = tmp_path / "g.toml"
    cfg.write_text('[[row]]\nname = "bad"\nkind = "ratio"\ngoal = "<= 1"\nN = 16\n'
                   'a = { method = "no_such_method" }\nb = { peer = "sdpa" }\n'
                   '[[row]]\nname = "good"\nkind = "error"\ngoal = "<= 100"\nN = 32\nheads = 1\nhead_dim = 8\n'
                   'a = { method = "softmax" }\nb = { peer = "sdpa" }\n')
    bad, good = goals.run(cfg)
    assert not bad["holds"] and "no_such_method" in bad["error"]
    assert good["holds"] and "error" not in good
    assert goals.format_figure(bad).startswith("ERROR")


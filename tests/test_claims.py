"""``attnzoo bench claims``: the verdict rules on synthetic figures, the quotes against
PAPERS.md, the records and the config, the report's claims section, and a tiny end-to-end
run (the real experiments are the benchmark's, not the tests')."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import matplotlib  # noqa: F401  (a dev dependency: the report tests must run, never skip)
import pytest
import torch

from attnzoo.bench import claims as C
from attnzoo.bench.results import load_config
from attnzoo.cli import main
from attnzoo.errors import AttentionInputError

PAPERS = Path("/work/shared/PAPERS.md")

# ------------------------------------------------------------------------------ the rules


def test_zoology_rule_holds_when_attention_solves_and_the_gap_narrows():
    acc = {"softmax": {32: 1.0, 64: 1.0, 128: 0.99}, "linear": {32: 0.3, 64: 0.6, 128: 0.9},
           "aaren": {32: 0.2, 64: 0.3, 128: 0.5}}
    verdict, figure, rule = C.zoology_rule(acc, "softmax", ["linear", "aaren"])
    assert verdict == C.HOLDS
    assert "gap 0.75 @32 → 0.29 @128" in figure and "0.9" in rule


@pytest.mark.parametrize("acc, why", [
    ({"softmax": {32: 1.0, 64: 1.0}, "linear": {32: 0.3, 64: 0.2}}, "does not narrow"),
    ({"softmax": {32: 0.5, 64: 0.6}, "linear": {32: 0.3, 64: 0.4}}, "never solves"),  # attention never solves
    ({"softmax": {32: 1.0, 64: 1.0}, "linear": {32: 0.9, 64: 0.95}}, "never solves"),  # no lead of 0.2 anywhere
    ({"softmax": {32: 1.0, 64: 0.3}, "linear": {32: 0.3, 64: 0.3}}, "does not solve at the widest"),
    ({"softmax": {32: 0.5, 64: 1.0}, "linear": {32: 0.3, 64: 0.3}}, "only at the widest"),
])
def test_zoology_rule_fails(acc, why):
    verdict, figure, _ = C.zoology_rule(acc, "softmax", ["linear"])
    assert verdict == C.FAILS and why in figure


def test_cab_rule():
    lags = {"noncausal_self": 0.1, "causal_self": 0.05, "noncausal_cross": 0.4, "causal_cross": 0.3}
    assert C.cab_rule(lags)[0] == C.HOLDS
    assert C.cab_rule({**lags, "causal_self": 0.5})[0] == C.FAILS  # the largest lag is in a self pattern
    # largest in a cross pattern, but the cross mean is not above the self mean
    assert C.cab_rule({"noncausal_self": 0.3, "causal_self": 0.3, "noncausal_cross": 0.35, "causal_cross": 0.0})[0] \
        == C.FAILS
    assert C.cab_rule({"causal_cross": 0.3})[0] == C.FAILS  # no self pattern to compare with


def test_sigmoid_rule():
    assert C.sigmoid_rule({"copy": (1.0, 0.97), "mqar": (1.0, 1.0)}, 0.05)[0] == C.HOLDS
    verdict, figure, _ = C.sigmoid_rule({"copy": (1.0, 0.97), "mqar": (1.0, 0.34)}, 0.05)
    assert verdict == C.FAILS and "0.66 on mqar" in figure


def _maps(hh_kl=0.2, hh_h=0.8, hh_rho=0.8):
    return {"softmax": {"kl": 0.0, "entropy": 0.76, "monotonicity": 1.0},
            "hedgehog": {"kl": hh_kl, "entropy": hh_h, "monotonicity": hh_rho},
            "elu+1": {"kl": 1.6, "entropy": 2.5, "monotonicity": 0.3},
            "relu": {"kl": 1.4, "entropy": 2.2, "monotonicity": 0.4},
            "FAVOR+": {"kl": 1.7, "entropy": 1.3, "monotonicity": 0.6}}


def test_hedgehog_rule():
    assert C.hedgehog_rule(_maps())[0] == C.HOLDS
    assert C.hedgehog_rule(_maps(hh_kl=0.8))[0] == C.FAILS  # better, but not "far better" (> 0.5 x 1.4)
    assert C.hedgehog_rule(_maps(hh_h=2.2))[0] == C.FAILS  # less spiky than FAVOR+
    assert C.hedgehog_rule(_maps(hh_rho=0.5))[0] == C.FAILS  # less monotone than FAVOR+


def test_quantizable_rule():
    base = {"max_abs": 10.0, "kurtosis": 20.0, "int8_error": 0.02}
    good = {"max_abs": 5.0, "kurtosis": 4.0, "int8_error": 0.01}
    assert C.quantizable_rule({"softmax": base, "clipped_softmax": good, "gated": good})[0] == C.HOLDS
    assert C.quantizable_rule({"softmax": base, "clipped_softmax": good,
                               "gated": {**good, "max_abs": 9.0}})[0] == C.FAILS  # 0.9x is not a shrink
    assert C.quantizable_rule({"softmax": base, "clipped_softmax": {**good, "int8_error": 0.03},
                               "gated": good})[0] == C.FAILS
    assert C.quantizable_rule({"softmax": base, "gated": good})[0] == C.FAILS  # a variant missing


def test_exponent_and_lightning_rules():
    assert C.exponent_rule(1.62, 1.5)[0] == C.HOLDS
    assert C.exponent_rule(1.8, 1.5)[0] == C.FAILS
    assert C.exponent_rule(None, 1.5)[0] == C.FAILS
    below = C.exponent_rule(1.09, 1.5)  # an O() is an upper bound: cheaper scaling is consistent with it
    assert below[0] == C.HOLDS and "below the bound" in below[1]
    assert C.lightning_rule(1.05, 1.1)[0] == C.HOLDS
    assert C.lightning_rule(1.05, 3.0)[0] == C.FAILS  # decode step grows with the prefill
    assert C.lightning_rule(1.6, 1.0)[0] == C.FAILS


def test_memory_rule():
    constant = {"aaren": {256: 272, 16384: 272}, "linear": {256: 8448, 16384: 8448},
                "softmax": {256: 2**18, 16384: 2**24}}
    verdict, figure, _ = C.memory_rule(constant)
    assert verdict == C.HOLDS and "64.00×" in figure
    assert C.memory_rule({**constant, "linear": {256: 8448, 16384: 9000}})[0] == C.FAILS
    assert C.memory_rule({**constant, "softmax": {256: 2**18, 16384: 2**19}})[0] == C.FAILS  # not growing


def test_the_expected_hip_exponent_is_the_slope_of_n_log_n():
    from attnzoo.bench.efficiency import scaling_exponent

    ns = [1024, 2048, 4096, 8192, 16384]
    e = scaling_exponent(ns, [n * math.log(n) for n in ns])
    assert 1.1 < e < 1.2  # 1 + 1/ln(n) around n = 4096


# ------------------------------------------------------------------------------ the metrics


def test_metrics_against_hand_computed_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g, dtype=torch.float64)
    assert abs(C._kurtosis(x) - 3.0) < 0.1  # a Gaussian's
    spiky = x.clone()
    spiky[0] = 200.0
    assert C._kurtosis(spiky) > 10
    # per-tensor INT8: the error grows when one outlier sets the scale
    assert C._int8_error(x) < 0.02 < C._int8_error(spiky)
    s = torch.randn(3, 8, 8, generator=g)
    w = torch.softmax(s, -1)
    assert C._spearman(w, s, causal=False) == pytest.approx(1.0)  # softmax is monotone in the scores
    assert C._spearman(-w, s, causal=False) == pytest.approx(-1.0)
    causal = torch.softmax(s.masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf")), -1)
    assert C._spearman(causal, s, causal=True) == pytest.approx(1.0)  # the masked entries are not ranked
    uniform = torch.full((2, 4, 16), 1 / 16)
    assert C._row_entropy(uniform) == pytest.approx(math.log(16))


def test_decode_memory_experiment_measures_the_states():
    cfg = {**C.DEFAULTS["decode_memory"], "methods": ["linear", "aaren"], "positions": [256, 1024], "head_dim": 8}
    nbytes = C.decode_memory_experiment(cfg)
    assert nbytes["linear"][256] == nbytes["linear"][1024] > 0
    assert nbytes["aaren"][256] == nbytes["aaren"][1024] > 0
    assert nbytes["softmax"][1024] >= 3 * nbytes["softmax"][256]  # the KV cache grows with N
    assert C.memory_rule(nbytes)[0] == C.HOLDS


# ------------------------------------------------------------------------------ quotes, records, config


def test_the_papers_figures_are_quoted_verbatim_from_papers_md():
    if not PAPERS.exists():
        pytest.skip("the catalog of the papers (/work/shared/PAPERS.md) is not on this machine")
    text = PAPERS.read_text(encoding="utf-8")
    for rid, claim in C.CLAIMS.items():
        quotes = re.findall(r"«[^»]*»", claim["paper_figure"])
        assert quotes, f"{rid}: no «quote» in its paper figure"
        for q in quotes + re.findall(r"\[J:[^\]]*\]", claim["paper_figure"]):
            assert q in text, f"{rid}: {q} is not in PAPERS.md"
        assert claim["paper"] in text, f"{rid}: the title {claim['paper']!r} is not in PAPERS.md"


def test_every_row_has_a_claim_and_every_experiment_rows():
    assert set(C.ROWS) == set(C.EXPERIMENTS) == set(C.DEFAULTS) - {"claims"}
    rows = [r for e in C.EXPERIMENTS for r in C.ROWS[e]]
    assert sorted(rows) == sorted(C.CLAIMS)


def test_records_format():
    row = C.ClaimRow("routing", "exponent 1.52", C.HOLDS, "within ±0.25", {"times_s": {1024: 0.1}})
    rec = row.record("complexity", "run-1", cost_s=2.0)
    assert rec["kind"] == "claim" and rec["key"] == "claim|routing" and rec["status"] == "ok" and rec["cost_s"] == 2.0
    for k in ("paper", "claim", "paper_figure", "our_figure", "verdict", "rule", "details", "run_id", "experiment"):
        assert k in rec
    assert json.loads(json.dumps(rec))["details"] == {"times_s": {"1024": 0.1}}
    with pytest.raises(ValueError, match="verdict"):
        C.ClaimRow("routing", "x", "maybe", "r").record("complexity", "run-1")
    errs = C.error_records("complexity", "boom", "run-1")
    assert [r["id"] for r in errs] == list(C.ROWS["complexity"])
    assert all(r["status"] == "error" and r["verdict"] is None and r["error"] == "boom" for r in errs)


def test_settings_and_the_shipped_configs():
    s = C.claims_settings({})
    assert s["zoology"]["attention"] == "softmax" and s["claims"]["experiments"] == list(C.EXPERIMENTS)
    with pytest.raises(AttentionInputError, match="unknown key"):
        C.claims_settings({"claims": {"zoology": {"widths": [1]}}})
    with pytest.raises(AttentionInputError, match="unknown"):
        C.claims_settings({"claims": {"experiments": ["zoology", "nope"]}})
    full, quick = (C.claims_settings(load_config(n)[0]) for n in ("claims", "claims-quick"))
    count = {}
    for name, s in (("full", full), ("quick", quick)):
        cases = C.training_cases(s)
        count[name] = len({c.key() for v in cases.values() for c in v})
        assert cases["cab"] and cases["zoology"] and cases["sigmoid"]
        assert {c.task for c in cases["cab"]} == {"classify", "copy", "reverse", "transduce"}
    assert count["quick"] <= 20 < count["full"]  # the quick config stays about a minute on 2 cores


# ------------------------------------------------------------------------------ the report


def _records():
    rows = [C.ClaimRow("zoology", "gap 0.70 @32 → 0.10 @128", C.HOLDS, "rule z"),
            C.ClaimRow("hip", "exponent 1.61", C.FAILS, "rule h"),
            *C.gpu_rows()]
    recs = [{"kind": "run", "run_id": "run-1", "sweep": "claims", "command": "attnzoo bench claims",
             "config": {"name": "claims"}, "machine": {"cpus": 2}}]
    recs += [r.record("x", "run-1") for r in rows]
    recs += C.error_records("decode_memory", "RuntimeError: boom", "run-1")
    return recs


def test_the_report_shows_the_claims_section(tmp_path):
    from attnzoo.bench.report import main_summary, render_report

    (tmp_path / "claims.jsonl").write_text("\n".join(json.dumps(r) for r in _records()) + "\n")
    out = render_report(tmp_path)
    md = out["markdown"].read_text()
    assert "## Claims of the papers" in md
    assert "2 cannot test on CPU" in md and "1 holds" in md and "1 does not hold" in md and "1 error" in md
    assert "«17% inference kernel speed-up over FLASHATTENTION2 on H100 GPUs»" in md
    assert "gap 0.70 @32 → 0.10 @128" in md and "ERROR: RuntimeError: boom" in md
    # the table rows are in the claims' order: zoology before hip before the GPU rows
    assert md.index("gap 0.70") < md.index("exponent 1.61") < md.index("FlashSigmoid is faster")
    html = out["html"].read_text()
    assert re.search(r'<td class="good"[^>]*>holds</td>', html)
    assert re.search(r'<td class="bad"[^>]*>does not hold</td>', html)
    assert re.search(r'<td class="muted"[^>]*>cannot test on CPU</td>', html)
    assert "5 claims checked (4 ok, 1 ERROR)" in main_summary(tmp_path)


def test_the_report_without_claims_has_no_claims_section(tmp_path):
    from attnzoo.bench.report import render_report

    rec = {"kind": "decode", "key": "decode|x", "method": "linear", "position": 256, "status": "ok",
           "median_s": 1e-4, "times_s": [1e-4], "run_id": "r"}
    (tmp_path / "efficiency.jsonl").write_text(json.dumps(rec) + "\n")
    assert "Claims of the papers" not in render_report(tmp_path)["markdown"].read_text()


# ------------------------------------------------------------------------------ end to end


TINY = """
name = "claims-tiny"
[claims]
experiments = ["sigmoid", "decode_memory", "gpu_kernels"]
workers = 1
timeout = 120
[claims.tasks]
tasks = ["copy"]
[claims.tasks.model]
d_model = 8
heads = 2
layers = 1
steps = 2
batch_size = 4
eval_examples = 8
[claims.tasks.copy]
seq_len = 8
[claims.decode_memory]
methods = ["linear"]
positions = [256, 1024]
head_dim = 8
"""


@pytest.mark.slow
def test_a_tiny_claims_run_end_to_end(tmp_path):
    from attnzoo.bench.report import render_report

    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    out = tmp_path / "res"
    assert main(["bench", "claims", "--config", str(cfg), "--out", str(out), "--strict"]) == 0
    recs = [json.loads(line) for line in (out / "claims.jsonl").read_text().splitlines()]
    assert recs[0]["kind"] == "run" and recs[0]["sweep"] == "claims"
    rows = {r["id"]: r for r in recs[1:]}
    assert set(rows) == {"sigmoid", "decode_memory", "flash_sigmoid", "lightning_kernel"}
    assert all(r["status"] == "ok" and r["verdict"] in C.VERDICTS for r in rows.values())
    assert rows["decode_memory"]["verdict"] == C.HOLDS
    assert rows["flash_sigmoid"]["verdict"] == C.UNTESTABLE
    acc = rows["sigmoid"]["details"]["accuracy"]["copy"]  # (softmax, sigmoid) after two steps
    assert len(acc) == 2 and all(0.0 <= a <= 1.0 for a in acc)
    md = render_report(out)["markdown"].read_text()
    assert "## Claims of the papers" in md and "sigmoid attention with b = −log n matches softmax" in md
    # --resume skips what is done; --only reruns one experiment and keeps the other rows
    assert main(["bench", "claims", "--config", str(cfg), "--out", str(out), "--resume"]) == 0
    again = [json.loads(line) for line in (out / "claims.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in again[len(recs):]] == ["run"]
    assert main(["bench", "claims", "--config", str(cfg), "--out", str(out), "--only", "gpu_kernels"]) == 0
    last = [json.loads(line) for line in (out / "claims.jsonl").read_text().splitlines()]
    assert [r.get("id") for r in last[len(again) + 1:]] == ["flash_sigmoid", "lightning_kernel"]
    assert {r.get("id") for r in last if r["kind"] == "claim"} == set(rows)

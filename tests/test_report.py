"""The benchmark report (``attnzoo report``): markdown, self-contained HTML and PNG plots
rendered from a synthetic results directory."""

from __future__ import annotations

import json
import sys
import types

import matplotlib  # noqa: F401  (a dev dependency: the report tests must run, never skip)
import pytest

from attnzoo.bench.efficiency import efficiency_length  # noqa: E402
from attnzoo.bench.report import (  # noqa: E402
    ReportError,
    format_efficiency_length,
    load_results,
    main_summary,
    render_report,
)

LENGTHS = [256, 512, 1024, 2048]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _eff(method, n, median, peak, *, impl="auto", status="ok", pattern="causal_self", mode="fwd+bwd", key=None,
         error=None):
    label = method if impl == "auto" else f"{method}:{impl}"
    ok = status == "ok"
    return {"kind": "efficiency", "key": key or f"{label}|{pattern}|{mode}|float32|{n}", "method": method,
            "impl": impl, "label": label, "impl_used": "tiled" if ok else None, "pattern": pattern, "seq_len": n,
            "mode": mode, "dtype": "float32", "batch": 1, "heads": 4, "kv_heads": None, "head_dim": 32,
            "repeats": 3, "options": {}, "status": status,
            "times_s": [median * 0.95, median, median * 1.05] if ok else [], "median_s": median if ok else None,
            "spread": 0.1 if ok else None, "peak_mib": peak if ok else None, "density": None, "max_error": None,
            "error": error, "run_id": "r2"}


def _task(task, method, acc, *, pattern="causal_self", seq_len=128, setting=None, status="ok", chance=0.1):
    setting = setting or {}
    return {"kind": "task", "key": f"{task}|{method}|{seq_len}|{json.dumps(setting, sort_keys=True)}", "task": task,
            "pattern": pattern, "method": method, "seq_len": seq_len, "setting": setting, "status": status,
            "accuracy": acc if status == "ok" else None, "chance": chance, "loss": 0.5, "train_s": 3.2,
            "steps": 200, "params": 12345, "error": None if status == "ok" else "boom", "run_id": "r2"}


# the method faster than SDPA from some N: SDPA quadratic, "linfast" linear but with a large constant
BASE_T = {n: 1e-3 * (n / 256) ** 2 for n in LENGTHS}
LIN_T = {n: 2.5e-3 * (n / 256) for n in LENGTHS}
BASE_M = {n: 4.0 * (n / 256) ** 2 for n in LENGTHS}
LIN_M = {n: 1.0 * (n / 256) for n in LENGTHS}


def _write(d, recs, malformed_tail=True):
    lines = [json.dumps(r) for r in recs]
    text = "\n".join(lines) + "\n"
    if malformed_tail:
        text += '{"kind": "efficiency", "key": "trunc'  # a killed run's partial last line
    d.write_text(text)


@pytest.fixture
def results(tmp_path):
    run = {"kind": "run", "run_id": "r1", "started": "2025-01-01T00:00:00", "command": "attnzoo bench",
           "config_file": "bench.toml", "config": {"lengths": LENGTHS}, "git_commit": "aaaa1111",
           "machine": {"machine": "x86_64", "processor": "x86_64", "python": "3.12", "torch": "2.13",
                       "threads": 2, "cpus": 2}}
    run2 = {**run, "run_id": "r2", "git_commit": "bbbb2222"}
    checks = [
        {"kind": "check", "key": "c|linfast|causal_self", "method": "linfast", "pattern": "causal_self",
         "impl_used": "chunked", "status": "ok", "out_error": 1e-6, "grad_error": 2e-6, "tolerance": 1e-4,
         "message": None, "run_id": "r1"},
        {"kind": "check", "key": "c|brokenmeth|causal_self", "method": "brokenmeth", "pattern": "causal_self",
         "impl_used": "fast", "status": "failed", "out_error": 0.5, "grad_error": None, "tolerance": 1e-4,
         "message": "output differs from the reference", "run_id": "r1"},
    ]
    eff = []
    for n in LENGTHS:
        eff.append(_eff("torch_sdpa", n, BASE_T[n], BASE_M[n]))
        eff.append(_eff("linfast", n, LIN_T[n], LIN_M[n]))
        eff.append(_eff("softmax", n, BASE_T[n] * 1.3, BASE_M[n] * 1.1, impl="tiled"))
        eff.append(_eff("brokenmeth", n, None, None, status="failed_check"))
        # the "fwd" mode with the baseline only, and a "noncausal_self" pattern
        eff.append(_eff("torch_sdpa", n, BASE_T[n] / 3, BASE_M[n] / 2, mode="fwd"))
        eff.append(_eff("torch_sdpa", n, BASE_T[n], BASE_M[n], pattern="noncausal_self"))
        eff.append(_eff("linfast", n, LIN_T[n] / 10, LIN_M[n] / 10, pattern="noncausal_self"))
    # an OOM case, and a duplicate key: the first (slow) record is superseded by the last
    eff.append(_eff("hungry", 256, 2e-3, 30.0))
    eff.append(_eff("hungry", 512, 9.87654, 50.0))  # superseded
    eff.append(_eff("hungry", 512, 7.5e-3, 60.0))
    eff.append(_eff("hungry", 1024, None, None, status="oom", error="out of memory (limit 2048 MiB)"))
    tasks = []
    for m, base in (("softmax", 0.9), ("linfast", 0.6)):
        tasks.append(_task("classify", m, base - 0.012, pattern="noncausal_self", chance=0.5))
        tasks.append(_task("copy", m, base + 0.031))
        for kv in (4, 8):
            tasks.append(_task("mqar", m, base - kv / 100, setting={"num_kv_pairs": kv}, seq_len=256))
    tasks.append(_task("copy", "hungry", None, status="oom"))
    decode = [{"kind": "decode", "key": f"decode|{m}|{p}", "method": m, "position": p, "status": "ok",
               "median_s": t * (p / 256) ** g, "times_s": [t * (p / 256) ** g], "peak_mib": 1.0,
               "state_bytes": 4096 * (p if g else 1), "run_id": "r1"}
              for m, t, g in (("softmax", 1e-4, 1), ("linfast", 2e-4, 0)) for p in (256, 1024, 4096)]
    _write(tmp_path / "efficiency.jsonl", [run, *checks, *eff, *decode])
    _write(tmp_path / "tasks.jsonl", [run2, *tasks], malformed_tail=False)
    (tmp_path / "tasks.jsonl").write_text((tmp_path / "tasks.jsonl").read_text() + "\n\n   \nnot json\n")
    return tmp_path


@pytest.fixture
def fake_ci(monkeypatch):
    mod = types.ModuleType("attnzoo.bench.tasks.suite")
    mod.compositional_index = lambda records: {"softmax": 0.8123, "linfast": 0.4567, "hungry": 0.0}
    monkeypatch.setitem(sys.modules, "attnzoo.bench.tasks.suite", mod)
    return mod


def test_report_files_plots_and_html_are_self_contained(results, fake_ci):
    paths = render_report(results)
    md, html = paths["markdown"], paths["html"]
    assert md == results / "report.md" and html == results / "report.html"
    assert md.exists() and html.exists()
    plots = paths["plots"]
    assert plots and all(p.parent == results / "plots" for p in plots)
    names = {p.name for p in plots}
    assert {"eff-float32-fwd-bwd-causal_self.png", "efflen-float32-fwd-bwd.png", "tasks-accuracy.png",
            "tasks-mqar.png"} <= names
    for p in plots:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, p
    text = md.read_text()
    for p in plots:
        assert f"](plots/{p.name})" in text
    page = html.read_text()
    assert page.count("data:image/png;base64,") == len(plots)
    assert 'src="plots/' not in page and "<link" not in page and "<script" not in page
    assert "http://" not in page and "https://" not in page
    assert "<table>" in page and "<style>" in page


def test_report_markdown_content(results, fake_ci):
    text = render_report(results)["markdown"].read_text()
    for name in ("torch_sdpa", "linfast", "softmax:tiled", "hungry", "brokenmeth"):
        assert name in text
    # header: both runs, and the commits differ
    assert "`r1`" in text and "`r2`" in text and "different git commits" in text
    assert "malformed" in text
    # the efficiency length of linfast equals efficiency_length's (time and memory), in its row
    t_len = efficiency_length(LENGTHS, [LIN_T[n] for n in LENGTHS], [BASE_T[n] for n in LENGTHS])
    m_len = efficiency_length(LENGTHS, [LIN_M[n] for n in LENGTHS], [BASE_M[n] for n in LENGTHS])
    assert t_len is not None and LENGTHS[0] < t_len < LENGTHS[-1]
    t_str, m_str = format_efficiency_length(t_len, LENGTHS), format_efficiency_length(m_len, LENGTHS)
    assert t_str == str(int(round(t_len)))
    rows = [line for line in text.splitlines() if line.startswith("| linfast |")]
    assert any(t_str in r and m_str in r for r in rows), rows
    # cheaper everywhere (noncausal linfast), never cheaper (softmax:tiled)
    assert "≤ 256" in text
    tiled = [line for line in text.splitlines() if line.startswith("| softmax:tiled |")]
    assert tiled and all("> 2048" in r for r in tiled)
    # the failed check, the OOM and FAILED CHECK cells
    assert "| brokenmeth | causal_self | fast | failed |" in text
    assert "OOM" in text and "FAILED CHECK" in text and "out of memory (limit 2048 MiB)" in text
    # the duplicate key: only the last record counts
    assert "9877" not in text and "7.50" in text
    # tasks: accuracies, MQAR average and per-setting table, the CI column
    for acc in ("0.888", "0.931", "0.588", "0.631", "0.860", "0.820", "0.840"):
        assert acc in text, acc
    assert "mqar (avg)" in text and "N=256, kv=4" in text and "N=256, kv=8" in text
    assert "| CI |" in text and "0.812" in text and "0.457" in text
    assert "chance" in text
    # decoding: softmax grows 16x from 256 to 4096, linfast stays flat
    assert "## Decoding" in text
    assert any(line.startswith("| softmax | 0.100 | 0.400 | 1.60 | 16.00 |") for line in text.splitlines())
    assert any(line.startswith("| linfast | 0.200 | 0.200 | 0.200 | 1.00 |") for line in text.splitlines())


def test_duplicate_key_kept_once_and_malformed_lines_skipped(results):
    res = load_results(results)
    keys = [r["key"] for r in res.efficiency]
    assert len(keys) == len(set(keys))
    hungry512 = [r for r in res.efficiency if r["key"] == "hungry|causal_self|fwd+bwd|float32|512"]
    assert len(hungry512) == 1 and hungry512[0]["median_s"] == 7.5e-3
    assert res.duplicates == 1
    assert len(res.skipped) == 2  # the truncated line and "not json"
    assert [r["run_id"] for r in res.runs] == ["r1", "r2"]


def test_ci_column_omitted_when_suite_is_missing(results, monkeypatch):
    monkeypatch.setitem(sys.modules, "attnzoo.bench.tasks.suite", None)  # import -> ImportError
    text = render_report(results, results / "out")["markdown"].read_text()
    assert "CI column omitted" in text and "| CI |" not in text
    assert "0.888" in text


def test_only_tasks_only_efficiency_and_summary(tmp_path, fake_ci):
    only_tasks = tmp_path / "t"
    only_tasks.mkdir()
    _write(only_tasks / "tasks.jsonl", [_task("copy", "softmax", 0.75), _task("copy", "linfast", 0.5)], False)
    text = render_report(only_tasks)["markdown"].read_text()
    assert "0.750" in text and "## Efficiency" not in text
    only_eff = tmp_path / "e"
    only_eff.mkdir()
    _write(only_eff / "efficiency.jsonl",
           [_eff(m, n, t[n], 1.0) for n in LENGTHS for m, t in (("torch_sdpa", BASE_T), ("linfast", LIN_T))])
    assert main_summary(only_eff).endswith(f"attnzoo report {only_eff}`")
    paths = render_report(only_eff)
    text = paths["markdown"].read_text()
    assert "## Tasks" not in text and "linfast" in text
    summary = main_summary(only_eff)
    assert "8 efficiency cases (8 ok)" in summary and str(paths["html"]) in summary


def test_cuda_records_use_the_allocator_peak(tmp_path):
    recs = []
    for n in LENGTHS:
        for m, t, mem in (("torch_sdpa", BASE_T, BASE_M), ("linfast", LIN_T, LIN_M)):
            r = _eff(m, n, t[n], 0.5)  # the resident-set growth: flat, not what a GPU run should show
            r.update(device="cuda", peak_alloc_mib=mem[n])
            recs.append(r)
    _write(tmp_path / "efficiency.jsonl", recs, False)
    paths = render_report(tmp_path)
    text = paths["markdown"].read_text()
    m_len = efficiency_length(LENGTHS, [LIN_M[n] for n in LENGTHS], [BASE_M[n] for n in LENGTHS])
    row = next(line for line in text.splitlines() if line.startswith("| linfast |"))
    assert format_efficiency_length(m_len, LENGTHS) in row
    assert "float32, cuda · fwd+bwd" in text
    assert {p.name for p in paths["plots"]} == {"eff-cuda-float32-fwd-bwd-causal_self.png",
                                                 "efflen-cuda-float32-fwd-bwd.png"}


def test_empty_or_missing_dir_raises(tmp_path):
    with pytest.raises(ReportError, match="no \\*.jsonl"):
        render_report(tmp_path)
    (tmp_path / "x.jsonl").write_text("\n{broken\n")
    with pytest.raises(ReportError, match="no benchmark records"):
        render_report(tmp_path)
    with pytest.raises(ReportError, match="does not exist"):
        render_report(tmp_path / "nope")


def test_missing_matplotlib_is_a_clear_error(results, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'attnzoo\[bench\]'"):
        render_report(results)


def _summary_row(text, label):
    """The cells of ``label``'s row in the efficiency-length summary table."""
    start = text.index("### Efficiency length summary")
    for line in text[start:].splitlines():
        if line.startswith(f"| {label} |"):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no summary row for {label}")


def test_efficiency_length_counts_a_baseline_that_ran_out_of_memory(tmp_path):
    """Only the method finishes at the largest N: it is the cheaper one there."""
    recs = [_eff("torch_sdpa", n, BASE_T[n] * 10, BASE_M[n]) for n in LENGTHS[:-1]]
    recs.append(_eff("torch_sdpa", LENGTHS[-1], None, None, status="oom"))
    recs += [_eff("linfast", n, LIN_T[n] * 10, BASE_M[n] * 2) for n in LENGTHS]  # slower and heavier below
    recs += [_eff("shape16", n, BASE_T[n], BASE_M[n]) for n in LENGTHS]
    for r in recs[-len(LENGTHS):]:
        r["heads"] = 16  # another shape: never compared with the H=4 baseline
    _write(tmp_path / "efficiency.jsonl", recs, False)
    text = render_report(tmp_path)["markdown"].read_text()
    time_cell = _summary_row(text, "linfast")[1]
    assert time_cell not in ("> 2048", "—") and int(time_cell) <= 2048
    assert "B1 H16/16 D32" in text  # its own section


def test_real_compositional_index_in_the_report(tmp_path):
    """The task table with the real CI (not a stand-in): softmax best, the method that
    failed a run scored at chance for it, and the leaky-causal mark on routing."""
    from attnzoo.bench.tasks.suite import compositional_index

    recs = [_task("copy", "softmax", 1.0), _task("copy", "linear", 0.5), _task("copy", "routing", 0.9),
            _task("reverse", "softmax", 1.0, pattern="noncausal_cross"),
            _task("reverse", "linear", 0.2, pattern="noncausal_cross"),
            _task("reverse", "routing", None, pattern="noncausal_cross", status="timeout", chance=0.1)]
    _write(tmp_path / "tasks.jsonl", recs, False)
    ci = compositional_index(recs)
    assert max(ci, key=ci.get) == "softmax"
    text = render_report(tmp_path)["markdown"].read_text()
    assert f"{ci['softmax']:.3f}" in text and f"{ci['routing']:.3f}" in text
    assert "0.900 ‡" in text  # routing's causal-task accuracy is marked
    assert "1.000 ‡" not in text


# ------------------------------------------------------------------------------ the data layer and the templates


def test_data_layer_derives_each_figure_once(results, fake_ci, monkeypatch):
    """Every efficiency length, exponent and the CI is computed once, in report_data; the
    summary table and the charts read the very groups the per-pattern tables read."""
    from attnzoo.bench import report_data

    calls = {"efflen": [], "exp": 0, "ci": 0}
    real_efflen, real_exp = report_data._efficiency_length, report_data.scaling_exponent

    def efflen(cells, base, field_):
        calls["efflen"].append((id(cells), field_))
        return real_efflen(cells, base, field_)

    def exp(ns, vs):
        calls["exp"] += 1
        return real_exp(ns, vs)

    real_ci = fake_ci.compositional_index

    def ci(records):
        calls["ci"] += 1
        return real_ci(records)

    monkeypatch.setattr(report_data, "_efficiency_length", efflen)
    monkeypatch.setattr(report_data, "scaling_exponent", exp)
    monkeypatch.setattr(fake_ci, "compositional_index", ci)
    render_report(results)
    assert len(calls["efflen"]) == len(set(calls["efflen"]))  # never the same series and field twice
    data = report_data.build_report(load_results(results))
    groups = [g for sec in data.efficiency.sections for g in sec.groups]
    compared = [s for g in groups if g.has_baseline for s in g.series if not s.baseline]
    assert len(calls["efflen"]) == 2 * 2 * len(compared)  # time and memory, in the render and in build_report
    with_ok = [s for g in groups for s in g.series if s.time_points]
    assert calls["exp"] == 2 * 2 * len(with_ok)
    assert calls["ci"] == 2
    # the summary's groups are the sections' groups (the same objects, not recomputed)
    assert all(any(g is h for h in groups) for g in data.efficiency.summary.groups)
    # the numbers themselves
    g = next(g for g in groups if (g.pattern, g.mode) == ("causal_self", "fwd+bwd"))
    lin = g.get("linfast")
    assert lin.eff_time.value == efficiency_length(LENGTHS, [LIN_T[n] for n in LENGTHS], [BASE_T[n] for n in LENGTHS])
    assert lin.eff_time.lengths == LENGTHS
    assert lin.case(512).ratio == pytest.approx(LIN_T[512] / BASE_T[512])
    assert lin.case(512).spread == 0.1 and lin.exp_time == pytest.approx(1.0)
    assert g.get("torch_sdpa").exp_time == pytest.approx(2.0) and g.get("torch_sdpa").eff_time is None
    hungry = g.get("hungry")
    assert hungry.case(512).median_ms == pytest.approx(7.5) and hungry.first_failure.status == "oom"
    tasks = data.tasks
    assert [c.header for c in tasks.columns] == ["classify", "copy", "mqar (avg)"]
    soft = next(r for r in tasks.rows if r.method == "softmax")
    assert [round(c.value, 3) for c in soft.cells] == [0.888, 0.931, 0.84] and soft.ci == 0.8123
    assert next(r for r in tasks.rows if r.method == "hungry").cells[1].state == "failed"
    dec = {r.method: r for r in data.decode.rows}
    assert dec["softmax"].growth == pytest.approx(16.0) and dec["linfast"].growth == pytest.approx(1.0)
    h = data.header
    assert h.commits == ["aaaa1111", "bbbb2222"] and len(h.skipped) == 2 and h.duplicates == 1
    assert data.checks.total == 2 and [c.method for c in data.checks.failed] == ["brokenmeth"]


def test_templates_render_the_data_not_the_records(results, fake_ci):
    """The Markdown shows what the data says: change a number in the data, the report follows."""
    from attnzoo.bench.report import render_markdown
    from attnzoo.bench.report_data import EffLength, build_report

    data = build_report(load_results(results))
    g = data.efficiency.summary.groups[0]
    g.get("linfast").eff_time = EffLength(777.0, LENGTHS)
    data.tasks.rows[0].ci = 0.31415
    text, tables = render_markdown(data)
    assert "777" in _summary_row(text, "linfast")
    assert "0.314" in text
    assert text.count("\n| ") >= sum(len(t.rows) + 1 for t in tables)  # every recorded table is in the text
    assert "\n\n\n" not in text and text.endswith("</details>\n")


def test_html_is_made_from_the_markdown_with_heading_ids_and_no_external_resource(results, fake_ci):
    import re

    paths = render_report(results)
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    # every heading has an id (toc), GitHub's anchors: the Markdown's contents links resolve in the page
    headings = re.findall(r"<h([1-6])([^>]*)>", page)
    assert headings and all('id="' in attrs for _, attrs in headings)
    ids = set(re.findall(r'<h[1-6] id="([^"]+)"', page))
    assert {"efficiency", "efficiency-length-summary-float32-fwdbwd", "float32--fwdbwd", "tasks",
            "mqar-by-sequence-length-and-key-value-pairs", "decoding", "configuration"} <= ids
    links = re.findall(r"\]\(#([^)]+)\)", md)
    assert links and set(links) <= ids
    assert set(re.findall(r'href="#([^"]+)"', page)) == set(links)
    # self-contained: no resource outside the page
    assert not re.findall(r'(?:src|href)="(?!data:image/png;base64,|#)', page)
    for bad in ("<link", "<script", "<iframe", "url(", "@import", "http:", "https:", "//fonts"):
        assert bad not in page, bad
    # the markdown library made it: tables, inline code, the warning quote, figures, the fenced config
    assert '<th style="text-align: right;">' in page and "<code>torch_sdpa</code>" in page
    assert "<blockquote>" in page and "different git commits" in page
    assert page.count("<figure>") == len(paths["plots"]) == page.count("<figcaption>")
    assert "<details><summary>config of run" in page and "<pre><code>{" in page
    # the cells keep their classes: failures red, faster than SDPA green, not run muted
    cells = [(re.search(r'class="(\w+)"', attrs).group(1), text)
             for attrs, text in re.findall(r"<td ([^>]*class=[^>]*)>([^<]*)</td>", page)]
    assert {"bad", "good", "muted", "base"} <= {c for c, _ in cells}
    assert {t for c, t in cells if c == "bad"} == {"OOM", "FAILED CHECK", "failed", "oom"}
    assert {t for c, t in cells if c == "muted"} == {"—", "n/a", "chance", "", "0.100", "0.500"}
    assert {t for c, t in cells if c == "base"} == {"torch_sdpa (baseline)"}
    linfast_ratio = f"{LIN_T[2048] / BASE_T[2048]:.2f}"
    assert ("good", linfast_ratio) in cells and ("good", "≤ 256") in cells


def test_templates_are_package_data():
    import importlib.resources
    import tomllib
    from pathlib import Path

    templates = importlib.resources.files("attnzoo.bench") / "templates"
    assert (templates / "report.md.j2").is_file() and (templates / "report.html.j2").is_file()
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "templates/*.j2" in pyproject["tool"]["setuptools"]["package-data"]["attnzoo.bench"]
    extras = pyproject["project"]["optional-dependencies"]
    dev_extras = {e for d in extras["dev"] if d.startswith("attnzoo[") for e in d[len("attnzoo["):-1].split(",")}
    dev = extras["dev"] + [d for e in dev_extras for d in extras[e]]  # dev includes bench by reference
    for lib in ("jinja2", "markdown", "matplotlib"):
        assert any(d.startswith(lib) for d in extras["bench"]) and any(d.startswith(lib) for d in dev)


def test_rendering_libraries_are_imported_lazily_with_a_clear_error(results, monkeypatch):
    import subprocess

    code = ("import sys, attnzoo.bench.report, attnzoo.bench.report_plots, attnzoo.bench.report_data\n"
            "print(sorted(m for m in ('matplotlib', 'jinja2', 'markdown') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    monkeypatch.setitem(sys.modules, "jinja2", None)
    with pytest.raises(ImportError, match=r"jinja2 and markdown: pip install 'attnzoo\[bench\]'"):
        render_report(results)

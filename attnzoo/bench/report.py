"""The benchmark report: ``attnzoo report DIR``.

:func:`render_report` reads every ``*.jsonl`` file of a results directory (the records
written by the efficiency sweep and the task suite) and writes

* ``report.md``: GitHub-flavoured markdown, with the plots linked as ``plots/*.png``;
* ``report.html``: the same content as one self-contained page (inline CSS, the plots
  embedded as base64 ``data:`` URIs, no external resources);
* ``plots/*.png``: time and memory against the sequence length (log-log, SDPA dashed
  black), efficiency-length bar charts and task-accuracy heatmaps.

The numbers come from :mod:`attnzoo.bench.report_data` (computed once), the figures from
:mod:`attnzoo.bench.report_plots`; this module only renders: the Markdown from the jinja2
template ``templates/report.md.j2``, and the HTML from that Markdown with the ``markdown``
library (``tables``, ``toc`` for the heading ids, ``fenced_code``) inside
``templates/report.html.j2``, which holds the CSS.

Rendering needs matplotlib, jinja2 and markdown (``pip install 'attnzoo[bench]'``); they
are imported only when a report is rendered.
"""

from __future__ import annotations

import base64
import html as _html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .efficiency import BASELINE
from .report_data import (
    MATPLOTLIB_HINT,
    Counts,
    MissingDependency,
    MissingMatplotlib,
    ReportData,
    ReportError,
    build_report,
    counts,
    distinct_commits,
    format_efficiency_length,
    load_results,
    status_text,
)
from .report_plots import PLOT_PREFIXES, draw_plots

__all__ = ["render_report", "main_summary", "load_results", "format_efficiency_length", "ReportError",
           "MissingMatplotlib", "MATPLOTLIB_HINT", "render_markdown", "render_html"]

TITLE = "attnzoo benchmark report"
PLOTS = "plots"  # the plots' folder, beside report.md
RENDER_HINT = "attnzoo report needs jinja2 and markdown: pip install 'attnzoo[bench]'"


def github_slug(text: str, separator: str = "-") -> str:
    """GitHub's heading anchors (lower case, punctuation dropped, each space a hyphen), so the
    Markdown's links work on GitHub and in the HTML alike; ``toc`` makes them unique."""
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", separator)


# ------------------------------------------------------------------------------ cell formatting


def _num(v: Optional[float]) -> str:
    """About three significant digits, never scientific notation for ordinary magnitudes."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    if a >= 0.001:
        return f"{v:.3f}".rstrip("0").rstrip(".") if a < 0.01 else f"{v:.3f}"
    return f"{v:.2e}"


def _ratio(r: Optional[float]) -> str:
    if r is None:
        return "—"
    return f"{r:.2f}" if r >= 0.1 else f"{r:.3f}"


def _short(text, limit=160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _oneline(text: str) -> str:
    return " ".join(str(text).split())


def _md_cell(c) -> str:
    text = c[0] if isinstance(c, tuple) else c
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;") or " "


MUTED = ("—", "muted")


def _status_cell(case):
    return (status_text(case.status), "muted" if case.status == "skipped" else "bad")


#: the mark of a figure that cannot be trusted (noisy, loaded machine, fwd+bwd < fwd); never green
SUSPECT = "⚠"


def _eff_len_cell(e, flagged: bool = False) -> tuple:
    text = format_efficiency_length(e.value, e.lengths)
    if flagged:
        return (f"{text} {SUSPECT}", "")
    return (text, "good" if e.value is not None else "")


def _acc(cell) -> tuple:
    if cell.state == "none":
        return MUTED
    if cell.state == "failed":
        return (cell.status, "bad")
    text, cls = (f"{cell.value:.3f}†", "part") if cell.state == "partial" else (f"{cell.value:.3f}", "")
    return (f"{text} ‡" if cell.leak else text, cls)


def summary_line(c: Counts) -> str:
    """``360 efficiency cases (358 ok, 2 OOM); 86 correctness checks (0 failing); ...``"""

    def others(t):
        bad = ", ".join(f"{n} {status_text(s)}" for s, n in t.others)
        return f", {bad}" if bad else ""

    parts = []
    if c.efficiency:
        parts.append(f"{c.efficiency.total} efficiency cases ({c.efficiency.ok} ok{others(c.efficiency)})")
    if c.checks:
        parts.append(f"{c.checks.total} correctness checks ({c.checks.failing} failing)")
    if c.tasks:
        parts.append(f"{c.tasks.total} task runs ({c.tasks.ok} ok{others(c.tasks)})")
    if c.decode:
        parts.append(f"{c.decode.total} decode cases ({c.decode.failing} failing)")
    if c.claims:
        parts.append(f"{c.claims.total} claims checked ({c.claims.ok} ok{others(c.claims)})")
    return "; ".join(parts) + "." if parts else "nothing to report."


# ------------------------------------------------------------------------------ the tables


@dataclass
class Table:
    """One table of the report: ``rows`` of cells, each a text or (text, css class);
    ``left``: the indices of the text (left-aligned) columns, the rest are numbers."""

    header: list
    rows: list
    left: set = field(default_factory=lambda: {0})


def runs_table(h) -> Table:
    rows = [[f"`{r.run_id}`", str(r.started or "—"), f"`{str(r.commit)[:12]}`" if r.commit else "—",
             f"`{_short(r.command, 90)}`" if r.command else "—", f"`{r.config_file}`" if r.config_file else "—",
             r.machine or "—"] for r in h.runs]
    return Table(["run", "started", "git commit", "command", "config", "machine"], rows, set(range(6)))


def checks_table(c) -> Table:
    rows = [[k.method, k.pattern, str(k.impl or "—"), (k.status, "bad"), _num(k.out_error), _num(k.grad_error),
             _num(k.tolerance), _short(k.message, 200)] for k in c.failed]
    return Table(["method", "pattern", "impl", "status", "out error", "grad error", "tolerance", "message"], rows,
                 {0, 1, 2, 3, 7})


def summary_table(s) -> Table:
    rows = []
    for lab in s.labels:
        row = [lab]
        for g in s.groups:
            series = g.get(lab)
            if series is None:
                row += [MUTED, MUTED]
            elif not g.has_baseline:
                row += [("no baseline", "muted")] * 2
            else:
                # timing flags bear on the time column only: memory is measured once, not timed
                row += [(format_efficiency_length(e.value, e.lengths) + (f" {SUSPECT}" if flagged else ""),
                         "muted" if not e.lengths else ("good" if e.value is not None and not flagged else ""))
                        for e, flagged in ((series.eff_time, series.flagged), (series.eff_mem, False))]
        rows.append(row)
    return Table(["method"] + [f"{g.pattern} {k}" for g in s.groups for k in ("time", "memory")], rows)


def eff_table(g) -> Table:
    nmax = g.lengths[-1]
    header = (["method", "impl"] + [f"ms @{n}" for n in g.lengths] + [f"ratio @{n}" for n in g.lengths]
              + [f"MiB @{nmax}", "exp time", "exp mem", "eff len time", "eff len mem"]
              + (["density @max"] if g.show_density else []) + (["max err"] if g.show_error else []))
    rows = []
    for s in g.series:
        row = [(s.label + (" (baseline)" if s.baseline else ""), "base" if s.baseline else ""),
               ", ".join(s.impls) or "—"]
        for n in g.lengths:
            c = s.case(n)
            if c is None:
                row.append(MUTED)
            elif c.ok:
                row.append(_num(c.median_ms) + (f" ±{c.spread * 100:.0f}%" if c.spread is not None else "")
                           + (f" {SUSPECT}" if c.flags else ""))
            else:
                row.append(_status_cell(c))
        for n in g.lengths:
            c = s.case(n)
            if c is not None and c.ratio is not None:
                # a flagged case (or baseline) is never highlighted as faster than SDPA
                row.append((_ratio(c.ratio) + ("" if c.trusted else f" {SUSPECT}"),
                            "good" if c.ratio < 1 and not s.baseline and c.trusted else ""))
            elif c is not None and not c.ok:
                row.append(_status_cell(c))
            else:
                row.append(MUTED)
        c = s.case(nmax)
        row.append(MUTED if c is None else _num(c.mem_mib) if c.ok else _status_cell(c))
        row += [f"{x:.2f}" if x is not None else "—" for x in (s.exp_time, s.exp_mem)]
        if s.baseline:
            row += [MUTED, MUTED]
        elif not g.has_baseline:
            row += [("no baseline", "muted")] * 2
        else:
            row += [_eff_len_cell(s.eff_time, s.flagged), _eff_len_cell(s.eff_mem)]
        if g.show_density:
            row.append(_num(s.density_at_max) if s.density_at_max is not None else "—")
        if g.show_error:
            row.append(f"{s.max_error:.2e}" if s.max_error is not None else "—")
        rows.append(row)
    return Table(header, rows, {0, 1})


def failures_table(failures) -> Table:
    rows = [[f.label, f.case.pattern, f.case.mode,
             f.case.dtype + ("" if f.case.device == "cpu" else f" ({f.case.device})"), str(f.case.n),
             _status_cell(f.case), _short(f.case.error, 200)] for f in failures]
    return Table(["method", "pattern", "mode", "dtype", "N", "status", "error"], rows, {0, 1, 2, 3, 5, 6})


def decode_table(d) -> Table:
    rows = []
    for r in d.rows:
        cells = [MUTED if c is None else (_num(c.median_ms) + (f" {SUSPECT}" if c.flags else "")) if c.ok
                 else _status_cell(c) for c in r.cases]
        growth = (_ratio(r.growth) if r.growth is not None
                  else (status_text(r.growth_status), "bad") if r.growth_status not in ("ok", "missing") else MUTED)
        rows.append([r.method, *cells, growth, _num(r.state_mib) if r.state_mib is not None else "—"])
    first, last = d.positions[0], d.positions[-1]
    return Table(["method"] + [f"ms @{p}" for p in d.positions] + [f"@{last} / @{first}", f"state MiB @{last}"],
                 rows)


def task_table(t) -> Table:
    with_ci = t.ci is not None
    rows = [[r.method] + [_acc(c) for c in r.cells]
            + ([f"{r.ci:.3f}" if r.ci is not None else MUTED] if with_ci else []) for r in t.rows]
    if any(col.chance is not None for col in t.columns):
        rows.append([("chance", "muted")]
                    + [(f"{col.chance:.3f}" if col.chance is not None else "—", "muted") for col in t.columns]
                    + ([("", "muted")] if with_ci else []))
    return Table(["method"] + [col.header for col in t.columns] + (["CI"] if with_ci else []), rows)


def setting_table(st) -> Table:
    return Table(["method"] + st.settings, [[r.method] + [_acc(c) for c in r.cells] for r in st.rows])


def failed_tasks_table(runs) -> Table:
    return Table(["task", "pattern", "method", "setting", "status", "error"],
                 [[r.task, r.pattern, r.method, r.setting, (status_text(r.status), "bad"), _short(r.error, 200)]
                  for r in runs], set(range(6)))


def task_runs_table(runs) -> Table:
    rows = [[r.task, r.pattern, r.method, r.setting, (r.status, "" if r.status == "ok" else "bad"),
             f"{r.accuracy:.3f}" if r.accuracy is not None else "—",
             f"{r.chance:.3f}" if r.chance is not None else "—", _num(r.loss),
             str(r.steps if r.steps is not None else "—"), _num(r.train_s),
             f"{r.params:,}" if r.params is not None else "—"] for r in runs]
    return Table(["task", "pattern", "method", "setting", "status", "accuracy", "chance", "loss", "steps", "train s",
                  "params"], rows, set(range(5)))


def banner_items(t, limit: int = 12) -> list:
    """The banner's lines: what cannot be trusted, each naming the cases (at most ``limit``)."""

    def names(items):
        more = len(items) - limit
        return "; ".join(items[:limit]) + (f"; … and {more} more (marked {SUSPECT} below)" if more > 0 else "")

    out = []
    if t.noisy:
        out.append(f"**{len(t.noisy)} noisy case(s)**: spread (max − min) / median still above "
                   f"{t.noise_threshold * 100:.0f}% after the re-measurements: {names(t.noisy)}.")
    if t.loaded:
        out.append(f"**Loaded machine**: {len(t.loaded)} case(s) ran while other processes took the cores they "
                   f"needed" + (f" ({t.loaded_detail})" if t.loaded_detail else "") + f": {names(t.loaded)}.")
    if t.inverted:
        out.append(f"**fwd+bwd faster than fwd** (impossible: one of the two is noise): {names(t.inverted)}.")
    if t.negative:
        out.append(f"**Negative scaling exponents** (time falling as N grows: noise or a too-short range): "
                   f"{names(t.negative)}.")
    if t.threads:
        out.append("**Mixed thread counts**: the cases ran with different torch threads ("
                   + ", ".join(f"{n} thread(s): {c} case(s)" for n, c in t.threads) + "): not comparable.")
    return out


def claims_table(c) -> Table:
    verdict = {"holds": "good", "does not hold": "bad", "cannot test on CPU": "muted"}
    rows = [[f"{ln.claim} ({ln.paper})", ln.paper_figure, ln.our_figure,
             (ln.verdict, verdict.get(ln.verdict, "")) if ln.verdict else (f"ERROR: {_short(ln.error, 200)}", "bad"),
             ln.rule] for ln in c.lines]
    return Table(["claim (paper)", "paper's figure", "our figure, same run", "verdict", "rule"], rows, set(range(5)))


VIEWS = {f.__name__: f for f in (runs_table, checks_table, summary_table, eff_table, failures_table, decode_table,
                                 task_table, setting_table, failed_tasks_table, task_runs_table, claims_table)}


# ------------------------------------------------------------------------------ rendering


def _libraries():
    try:
        import jinja2
        import markdown
    except ImportError as e:
        raise MissingDependency(RENDER_HINT) from e
    return jinja2, markdown


def _environment():
    jinja2, _ = _libraries()
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("attnzoo.bench", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
        extensions=["jinja2.ext.do"])
    env.filters.update(cell=_md_cell, short=_short, oneline=_oneline)
    env.globals.update(VIEWS, summary_line=summary_line, plots_dir=PLOTS, baseline=BASELINE,
                       banner_items=banner_items, suspect=SUSPECT)
    return env


def _converter(images: Optional[dict] = None, tables: Optional[list] = None):
    """A ``markdown.Markdown`` with the report's extensions; ``images`` ({src: PNG bytes})
    are embedded as data URIs and ``tables`` (the :class:`Table` s in the order they were
    rendered) give the cells their css classes."""
    _, markdown = _libraries()
    from markdown.extensions import Extension
    from markdown.treeprocessors import Treeprocessor

    class Embed(Treeprocessor):
        def run(self, root):
            parents = {child: parent for parent in root.iter() for child in parent}
            for img in list(root.iter("img")):
                png = (images or {}).get(img.get("src"))
                if png is None:
                    continue
                img.set("src", "data:image/png;base64," + base64.b64encode(png).decode("ascii"))
                p = parents.get(img)
                if p is not None and p.tag == "p" and len(p) == 1 and not (p.text or "").strip() \
                        and not (img.tail or "").strip():
                    p.tag = "figure"
                    caption = p.makeelement("figcaption", {})
                    caption.text = img.get("alt", "")
                    p.append(caption)
            found = list(root.iter("table"))
            if tables is None or len(found) != len(tables):
                return
            for el, t in zip(found, tables):
                body = el.find("tbody")
                for tr, row in zip(body.findall("tr") if body is not None else [], t.rows):
                    for td, c in zip(tr.findall("td"), row):
                        if isinstance(c, tuple) and c[1]:
                            td.set("class", c[1])

    class ReportExtension(Extension):
        def extendMarkdown(self, md):
            md.treeprocessors.register(Embed(md), "attnzoo_embed", 3)  # after the inline patterns (20)

    return markdown.Markdown(extensions=["tables", "fenced_code", "toc", ReportExtension()],
                             extension_configs={"toc": {"slugify": github_slug}})


def render_markdown(data: ReportData) -> tuple:
    """``(markdown text, [Table])``: the report rendered from ``data`` by ``report.md.j2``,
    and its tables in order. Rendered twice: ``toc`` reads the headings of the first pass,
    and the second lists them, with their ids, under **Contents**."""
    template = _environment().get_template("report.md.j2")

    def render(contents):
        tables: list = []  # the template's macro ``table`` records each table it writes
        text = template.render(r=data, contents=contents, record=lambda t: tables.append(t) or "")
        return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n", tables

    text, tables = render([])
    contents = _headings(text)
    return render(contents) if contents else (text, tables)


def _headings(markdown_text: str) -> list:
    """``[(level, text, id)]`` of the h2 and h3 headings, the ids as ``toc`` assigns them."""
    md = _converter()
    md.convert(markdown_text)
    out = []

    def walk(tokens):
        for tok in tokens:
            if 2 <= tok["level"] <= 3:
                out.append((tok["level"], _html.unescape(tok["name"]), tok["id"]))
            walk(tok["children"])

    walk(md.toc_tokens)
    return out


def render_html(markdown_text: str, tables: Optional[list] = None, images: Optional[dict] = None,
                title: str = TITLE) -> str:
    """The self-contained page: ``markdown_text`` converted by the ``markdown`` library inside
    ``report.html.j2``; ``images`` ({"plots/x.png": PNG bytes}) embedded as data URIs."""
    body = _converter(images, tables).convert(markdown_text)
    return _environment().get_template("report.html.j2").render(title=title, body=body)


def render_report(results_dir, out_dir=None) -> dict:
    """Write ``report.md``, ``report.html`` and ``plots/*.png`` for the results in
    ``results_dir`` into ``out_dir`` (default: ``results_dir``).

    Returns ``{"markdown": Path, "html": Path, "plots": [Path, ...]}``. Raises
    :class:`ReportError` (an ``AttentionInputError``) when the directory is missing or
    holds no records, :class:`MissingMatplotlib` (also an ``ImportError``) without
    matplotlib.
    """
    res = load_results(results_dir)
    out = Path(out_dir) if out_dir is not None else Path(results_dir)
    _libraries()
    data = build_report(res)
    out.mkdir(parents=True, exist_ok=True)
    plots_dir = out / PLOTS
    pngs = draw_plots(data, plots_dir)
    text, tables = render_markdown(data)
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(text, encoding="utf-8")
    html_path.write_text(render_html(text, tables, {f"{PLOTS}/{name}": png for name, png in pngs.items()}),
                         encoding="utf-8")
    if plots_dir.is_dir():  # plots of an earlier render that this one no longer has
        for p in plots_dir.glob("*.png"):
            if p.name not in pngs and p.name.startswith(PLOT_PREFIXES):
                p.unlink()
    return {"markdown": md_path, "html": html_path, "plots": [plots_dir / name for name in pngs]}


def main_summary(results_dir, out_dir=None) -> str:
    """A few lines for the terminal: how many cases are ok / failing, and where the report is."""
    res = load_results(results_dir)
    lines = [summary_line(counts(res))]
    if res.skipped:
        lines.append(f"skipped {len(res.skipped)} malformed line(s)")
    commits = distinct_commits(res)
    if len(commits) > 1:
        lines.append(f"warning: the runs come from {len(commits)} different git commits")
    out = Path(out_dir) if out_dir is not None else Path(results_dir)
    html_path, md_path = out / "report.html", out / "report.md"
    if html_path.exists():
        lines.append(f"report: {html_path} (and {md_path.name}, {out / PLOTS}/)")
    else:
        lines.append(f"no report yet: run `attnzoo report {results_dir}`")
    return "\n".join(lines)

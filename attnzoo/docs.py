"""The documentation, generated from the registry and the docstrings: it never goes stale.

    python -m attnzoo.docs SOURCE_DIR        # the Markdown pages and mkdocs.yml
    make docs                                 # the same, then `mkdocs build` into site/

One page per method (its maths and paper from its file's docstring, every option with
its default and meaning from its options class, patterns, implementations, decoding),
a page per family, the API reference (mkdocstrings, from the docstrings) and the README's
introduction. :func:`method_info` is also what ``attnzoo info METHOD`` prints.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from pathlib import Path

from . import registry
from .registry import PATTERNS

ROOT = Path(__file__).resolve().parents[1]


def _strictly_causal(info: dict) -> str:
    """The cell for a method's causal forms: a leak named, or "n/a" without any."""
    if not any(p.startswith("causal") for p in info["patterns"]):
        return "n/a (no causal pattern)"
    return "no: " + _cell(info["causal_leak"]) if info["causal_leak"] else "yes"


def option_meanings(options_cls) -> dict:
    """``{option: meaning}`` from the ``Attributes:`` section of an options class's docstring
    (``name: text`` or ``a, b: text`` entries, continued on more indented lines)."""
    doc = inspect.getdoc(options_cls) or ""
    if "Attributes:" not in doc:
        return {}
    body = doc.split("Attributes:", 1)[1]
    meanings, names, text = {}, [], []

    def flush():
        for n in names:
            meanings[n] = " ".join(text).strip()

    for line in body.splitlines():
        if not line.strip():
            continue
        m = re.match(r"^\s{0,8}([A-Za-z_][\w, ]*):\s*(.*)$", line)
        indent = len(line) - len(line.lstrip())
        if m and indent <= 4 and all(part.strip().isidentifier() for part in m.group(1).split(",")):
            flush()
            names = [part.strip() for part in m.group(1).split(",")]
            text = [m.group(2)]
        elif names:
            text.append(line.strip())
        else:
            break
    flush()
    return meanings


def method_info(spec) -> dict:
    """Everything a user asks about a method, as plain data (``attnzoo info`` and the docs)."""
    module = sys.modules[spec.reference.__module__]
    meanings = option_meanings(spec.options_cls)
    impl_only = {o: i.name for i in spec.impls for o in i.options}
    if spec.decoder is not None:
        impl_only.update({o: "decoding" for o in spec.decoder.options})
    options = []
    for f in dataclasses.fields(spec.options_cls):
        default = getattr(spec._defaults, f.name)
        options.append({"name": f.name, "default": repr(default), "meaning": meanings.get(f.name, ""),
                        "only": impl_only.get(f.name, "")})
    impls = [{"name": "reference", "description": "the defining implementation (plain PyTorch, reads like the paper)"}]
    impls += [{"name": i.name, "description": i.description} for i in spec.impls]
    return {
        "name": spec.name, "family": spec.family, "summary": spec.summary, "paper": spec.paper,
        "doc": inspect.cleandoc(module.__doc__ or ""), "module": module.__name__,
        "patterns": [p for p in PATTERNS if p in spec.patterns],
        "unsupported": [p for p in PATTERNS if p not in spec.patterns],
        "exact": spec.exact, "time": spec.time, "memory": spec.memory,
        "options": options, "impls": impls,
        "masks": spec.masks, "score_mods": spec.score_mods, "gqa": spec.gqa, "dropout": spec.dropout,
        "decoding": spec.state_size if spec.decoding else None, "learnable": spec.learnable,
        "module_class": spec.module.__name__ if spec.module is not None else None,
        "causal_leak": spec.causal_leak, "sized": spec.sized_options(256), "layer_options": spec.layer_options,
    }


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def method_page(spec) -> str:
    info = method_info(spec)
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    lines = [f"# {spec.name}", "", f"*{info['summary']}* — family `{info['family']}`, "
             f"paper: **{info['paper']}**", "", "```text", info["doc"], "```", "", "## At a glance", "",
             "| | |", "|---|---|",
             f"| patterns | {', '.join(info['patterns'])} |",
             f"| exact softmax | {yes(info['exact'])} |",
             f"| time / memory | {_cell(info['time'])} / {_cell(info['memory'])} |",
             f"| masks | {'any (dense and mask_mod)' if info['masks'] else 'key padding only'} |",
             f"| float masks / score_mods | {yes(info['score_mods'])} |",
             f"| grouped-query (GQA) | {yes(info['gqa'])} |",
             f"| dropout | {yes(info['dropout'])} |",
             f"| decoding | {_cell(info['decoding']) if info['decoding'] else 'no'} |",
             f"| parameters | {info['module_class'] or 'none'} |",
             f"| layer recipe | {_cell(info['layer_options']) if info['layer_options'] else '—'} |",
             f"| strictly causal | {_strictly_causal(info)} |",
             "", "## Options", ""]
    if info["options"]:
        lines += ["| option | default | meaning | only for |", "|---|---|---|---|"]
        lines += [f"| `{o['name']}` | `{_cell(o['default'])}` | {_cell(o['meaning'])} | {o['only']} |"
                  for o in info["options"]]
    else:
        lines.append("None.")
    lines += ["", f"Sized for N = 256 (what the tests, the benchmark and the tasks use): `{info['sized']}`.", "",
              "## Implementations", "", "| impl | what it is |", "|---|---|"]
    lines += [f"| `{i['name']}` | {_cell(i['description'])} |" for i in info["impls"]]
    lines += ["", "## Use", "", "```python", "import attnzoo as az",
              f"out = az.attention(q, k, v, method={spec.name!r}"
              + (", causal=True" if "noncausal_self" not in spec.patterns else "") + ")", "```", ""]
    return "\n".join(lines)


def family_page(family: str, specs: list) -> str:
    from importlib import import_module

    doc = inspect.cleandoc(import_module(f"attnzoo.methods.{family}").__doc__ or "")
    lines = [f"# {family}", "", doc, "", "| method | summary | patterns | time | paper |", "|---|---|---|---|---|"]
    for s in specs:
        r = s.row()
        lines.append(f"| [{s.name}](../methods/{s.name}.md) | {_cell(s.summary)} | {r['patterns']} | "
                     f"{_cell(s.time)} | {_cell(s.paper)} |")
    return "\n".join(lines) + "\n"


API_PAGE = """# API

::: attnzoo.attention

::: attnzoo.build

::: attnzoo.use

::: attnzoo.Attention

::: attnzoo.registry.MethodSpec

::: attnzoo.registry.MethodOptions

::: attnzoo.decoding

::: attnzoo.masks

::: attnzoo.integrations.hf

::: attnzoo.conversion

## Layers

::: attnzoo.layers.vision

::: attnzoo.layers.token_reduction

::: attnzoo.layers.mixtures

::: attnzoo.layers.fusion

## Sequence parallelism

::: attnzoo.distributed

## Analysis

::: attnzoo.analysis
"""


def build_source(out: Path) -> Path:
    """Write the Markdown pages and ``mkdocs.yml`` under ``out``; returns the config path."""
    out = Path(out)
    docs = out / "docs"
    (docs / "methods").mkdir(parents=True, exist_ok=True)
    (docs / "families").mkdir(parents=True, exist_ok=True)
    specs = registry.list_methods()
    families: dict = {}
    for s in specs:
        families.setdefault(s.family, []).append(s)
        (docs / "methods" / f"{s.name}.md").write_text(method_page(s))
    for family, members in families.items():
        (docs / "families" / f"{family}.md").write_text(family_page(family, members))
    readme = (ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "# attnzoo\n"
    (docs / "index.md").write_text(readme)
    (docs / "api.md").write_text(API_PAGE)
    adding = ROOT / "docs" / "adding_a_method.md"
    if adding.exists():
        (docs / "adding_a_method.md").write_text(adding.read_text())
    nav = ["  - Home: index.md", "  - Families:"]
    nav += [f"    - {f}: families/{f}.md" for f in families]
    nav += ["  - Methods:"] + [f"    - {s.name}: methods/{s.name}.md" for s in specs]
    nav += ["  - API: api.md"] + (["  - Adding a method: adding_a_method.md"] if adding.exists() else [])
    config = out / "mkdocs.yml"
    config.write_text("\n".join([
        "site_name: attnzoo",
        "site_description: Attention mechanisms from the literature behind one PyTorch API",
        "docs_dir: docs",
        "theme:",
        "  name: readthedocs",
        "markdown_extensions:",
        "  - tables",
        "  - toc:",
        "      permalink: true",
        "plugins:",
        "  - search",
        "  - mkdocstrings:",
        "      handlers:",
        "        python:",
        f"          paths: [{ROOT}]",
        "          options:",
        "            docstring_style: google",
        "            docstring_options:",
        "              warn_missing_types: false",
        # the project documents related arguments together ("dim, heads: ..."), which
        # griffe would report as parameters missing from the signature
        "              warn_unknown_params: false",
        "            show_source: false",
        "            members_order: source",
        "nav:",
        *nav,
        "",
    ]))
    return config


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else ROOT / "build" / "docs-src"
    print(build_source(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

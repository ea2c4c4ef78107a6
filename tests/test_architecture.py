"""The package's layering, read from the source (ast), and what a new method costs.

Dependencies point down only: leaves (errors, stats) < kernels < checks < registry <
methods < the API (api, decoding, masks) < layers < the tools (bench, analysis,
integrations, distributed, cli). A method imports kernels, never another method; the
module graph has no cycle, function-level imports included.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "attnzoo"

#: Layer of each top-level part of the package; a module may import its own layer or below.
LAYERS = {
    "errors": 0, "stats": 0, "data": 0, "allocator": 0,
    "kernels": 1,
    "checks": 2,
    "registry": 3,
    "methods": 4,
    "api": 5, "decoding": 5, "masks": 5,
    "layers": 6,
    "bench": 7, "analysis": 7, "integrations": 7, "distributed": 7, "conversion": 7, "docs": 7,
    "cli": 8, "__main__": 9, "__init__": 9,
}
#: What a method file may import (besides torch and the standard library).
METHOD_MAY_IMPORT = ("attnzoo.kernels", "attnzoo.registry", "attnzoo.errors", "attnzoo.stats", "attnzoo.checks")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, modules: dict, source: str = None) -> set:
    """Every attnzoo module ``path`` imports (anywhere in the file, functions included)."""
    name = module_name(path)
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("attnzoo"):
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("attnzoo"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    return {m for m in found if m in modules and m != name}


def graph() -> dict:
    modules = all_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_part_has_a_layer():
    unknown = sorted({part(m) for m in all_modules()} - set(LAYERS))
    assert not unknown, f"give these parts of the package a layer in LAYERS: {unknown}"


def test_nothing_imports_a_layer_above_it():
    bad = []
    for mod, deps in graph().items():
        for dep in deps:
            if LAYERS[part(dep)] > LAYERS[part(mod)]:
                bad.append(f"{mod} -> {dep}")
    assert not bad, "imports pointing up:\n" + "\n".join(sorted(bad))


def test_methods_import_kernels_never_another_method():
    bad = []
    for mod, deps in graph().items():
        if not mod.startswith("attnzoo.methods."):
            continue
        for dep in deps:
            if dep.startswith("attnzoo.methods"):
                bad.append(f"{mod} -> {dep} (a method imports another method)")
            elif not dep.startswith(METHOD_MAY_IMPORT):
                bad.append(f"{mod} -> {dep} (a method imports only {', '.join(METHOD_MAY_IMPORT)})")
    assert not bad, "\n".join(sorted(bad))


def test_kernels_import_only_kernels_and_errors():
    bad = [f"{m} -> {d}" for m, deps in graph().items() if m.startswith("attnzoo.kernels")
           for d in deps if not d.startswith(("attnzoo.kernels", "attnzoo.errors"))]
    assert not bad, "\n".join(sorted(bad))


def find_cycle(g: dict):
    state, stack = {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(g):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_module_graph_has_no_cycle():
    g = {m: {d for d in deps if d != "attnzoo"} for m, deps in graph().items() if m != "attnzoo"}
    cycle = find_cycle(g)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_reader_sees_relative_and_function_level_imports():
    modules = {"attnzoo.methods.x.a": None, "attnzoo.methods.x.b": None, "attnzoo.kernels": None,
               "attnzoo.kernels.dense": None, "attnzoo.api": None}
    source = "from ...kernels import dense\nimport attnzoo.api\ndef f():\n    from . import b\n"
    found = imports_of(ROOT / "attnzoo" / "methods" / "x" / "a.py", modules, source)
    assert found == {"attnzoo.kernels.dense", "attnzoo.methods.x.b", "attnzoo.api"}


def test_no_package_attribute_shadows_a_submodule():
    """``attnzoo.X`` is the module ``attnzoo/X.py`` whenever both exist, so ``import
    attnzoo.X as m`` and pydoc reach it (a function named like its module hid it)."""
    import importlib
    import pkgutil

    import attnzoo

    for info in pkgutil.iter_modules(attnzoo.__path__):
        if info.name.startswith("_"):  # __main__ runs the command
            continue
        module = importlib.import_module(f"attnzoo.{info.name}")
        assert getattr(attnzoo, info.name) is module, f"attnzoo.{info.name} is not the module attnzoo/{info.name}"


def test_attnzoo_methods_is_the_package_with_every_family():
    import attnzoo
    import attnzoo.methods.linear  # noqa: F401  (a family is importable, its docstring reachable)

    assert attnzoo.methods.__name__ == "attnzoo.methods"
    families = {s.family for s in attnzoo.list_methods()}
    for family in families:
        pkg = sys.modules.get(f"attnzoo.methods.{family}")
        assert pkg is not None and pkg.__doc__, f"family folder {family} has no package docstring"
    for spec in attnzoo.list_methods():
        mod = sys.modules[spec.reference.__module__]
        assert mod.__doc__ and len(mod.__doc__) > 200, f"{spec.name}: its file needs a docstring (maths, paper)"
        assert mod.__name__ == f"attnzoo.methods.{spec.family}.{spec.name}", (
            f"{spec.name} lives in {mod.__name__}; a method's file is methods/<family>/<name>.py")


ADD_A_METHOD = textwrap.dedent('''
    """Scaled cosine attention: softmax of (cos(q, k) / tau) V — a throwaway method."""

    from dataclasses import dataclass

    import torch

    from ...kernels.dense import softmax_attention
    from ...registry import MethodOptions, method


    @dataclass(frozen=True)
    class CosineOptions(MethodOptions):
        tau: float = 0.1


    @method("throwaway_cosine", options=CosineOptions, summary="softmax over cosine similarities",
            paper="(none: a test)")
    def throwaway_cosine(q, k, v, call):
        qn, kn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
        return softmax_attention(qn, kn, v, scale=1.0 / call.options.tau, causal=call.causal, mask=call.mask,
                                 key_mask=call.key_mask, return_weights=call.return_weights)


    @throwaway_cosine.impl("sdpa", description="SDPA on normalised q, k")
    def sdpa(q, k, v, call):
        qn, kn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
        mask = call.masker.full()
        return torch.nn.functional.scaled_dot_product_attention(qn, kn, v, attn_mask=mask,
                                                                scale=1.0 / call.options.tau,
                                                                enable_gqa=call.q_heads != call.kv_heads)
''')


def test_adding_a_method_is_one_file(tmp_path):
    """Drop one file into a copy of the package: the method is registered, listed, callable
    by name, and its sizing hook and options work — nothing else is edited."""
    import shutil

    copy = tmp_path / "pkg"
    shutil.copytree(PACKAGE, copy / "attnzoo", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "attnzoo" / "methods" / "softmax" / "throwaway_cosine.py").write_text(ADD_A_METHOD)
    script = textwrap.dedent('''
        import torch, attnzoo as az
        spec = az.get("throwaway_cosine")
        assert spec.family == "softmax" and "throwaway_cosine" in [s.name for s in az.list_methods()]
        q = torch.randn(1, 2, 9, 8)
        a = az.attention(q, q, q, method="throwaway_cosine", causal=True, impl="reference")
        b = az.attention(q, q, q, method="throwaway_cosine", causal=True, impl="sdpa", tau=0.1)
        torch.testing.assert_close(a, b)
        try:
            az.attention(q, q, q, method="throwaway_cosine", tua=0.2)
        except az.AttentionInputError as e:
            assert "Did you mean 'tau'" in str(e)
        else:
            raise AssertionError("no error for a misspelled option")
        print("ok")
    ''')
    res = subprocess.run([sys.executable, "-c", script], cwd=copy, capture_output=True, text=True,
                         env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr

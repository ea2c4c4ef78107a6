"""The documentation comes from the registry: a page per method (maths, options with
defaults and meanings, patterns, impls, paper), built by mkdocs; ``attnzoo info`` and
``attnzoo --version``; the files a serious package ships."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import attnzoo as az
from attnzoo import cli, docs

ROOT = Path(__file__).resolve().parents[1]


def test_option_meanings_are_read_from_the_options_docstring():
    meanings = docs.option_meanings(az.get("sliding_window").options_cls)
    assert meanings["window"].startswith("keys per query")
    assert "block" in meanings["block_size"]
    both = docs.option_meanings(az.get("softmax").options_cls)
    assert both["block_q"] == both["block_k"] and "tile sizes" in both["block_q"]


def test_every_method_has_a_page_with_its_options_patterns_impls_and_paper(tmp_path):
    docs.build_source(tmp_path)
    for spec in az.list_methods():
        page = (tmp_path / "docs" / "methods" / f"{spec.name}.md").read_text()
        assert spec.paper.split(":")[0] in page
        for option in spec.options:
            assert f"`{option}`" in page, (spec.name, option)
        for impl in spec.impl_names:
            assert f"`{impl}`" in page
        for pattern in spec.patterns:
            assert pattern in page
    nav = (tmp_path / "mkdocs.yml").read_text()
    assert all(f"methods/{s.name}.md" in nav for s in az.list_methods())


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path):
    # no -q: mkdocs -q hides warnings from --strict, so a griffe warning would pass unseen
    config = docs.build_source(tmp_path / "src")
    mkdocs = Path(sys.executable).with_name("mkdocs")
    res = subprocess.run([str(mkdocs), "build", "--strict", "-f", str(config), "-d", str(tmp_path / "site")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    html = (tmp_path / "site" / "methods" / "hedgehog" / "index.html").read_text()
    assert "Hedgehog" in html and "chunk" in html
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "key_padding_mask" in api and "attn_mask" in api  # mkdocstrings read the docstrings


def test_info_prints_one_method(capsys):
    assert cli.main(["info", "sigmoid"]) == 0
    out = capsys.readouterr().out
    assert "Theory, Analysis, and Best Practices for Sigmoid Self-Attention" in out
    assert "bias" in out and "chunked" in out and "causal_self" in out
    assert cli.main(["info", "sigmod"]) == 2
    assert "Did you mean 'sigmoid'" in capsys.readouterr().err


def test_version_and_package_files():
    res = subprocess.run([sys.executable, "-m", "attnzoo", "--version"], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == f"attnzoo {az.__version__}"
    for name in ("LICENSE", "CHANGELOG.md", "attnzoo/py.typed"):
        assert (ROOT / name).exists(), name
    assert az.__version__ in (ROOT / "CHANGELOG.md").read_text()

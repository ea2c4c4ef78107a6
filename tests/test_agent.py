"""Agent attention: both implementations against the paper's two-step formula written
out here (agents by explicit window averages, softmaxes, the depthwise convolution by
torch.nn.functional.conv1d/conv2d), in 1-D and on 2-D grids, and the module's DWC."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo.errors import AttentionInputError, UnsupportedPattern

from helpers import CASES, assert_three_way, call, make_inputs, run

IMPLS = ["reference", "agent"]


def qkv(B=2, Hq=2, Hkv=2, Nq=30, Nk=30, D=8, Dv=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Nq, D, generator=g, dtype=dtype), torch.randn(B, Hkv, Nk, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, Nk, Dv, generator=g, dtype=dtype))


def windows(n_in, n_out):
    """Adaptive pooling windows: [floor(i n_in / n_out), ceil((i+1) n_in / n_out))."""
    return [(math.floor(i * n_in / n_out), math.ceil((i + 1) * n_in / n_out)) for i in range(n_out)]


def agents_1d(q, n):
    return torch.stack([q[:, :, s:e].mean(2) for s, e in windows(q.shape[2], n)], dim=2)


def agents_2d(q, grid, agent_grid):
    B, H, _, D = q.shape
    x = q.view(B, H, grid[0], grid[1], D)
    rows, cols = windows(grid[0], agent_grid[0]), windows(grid[1], agent_grid[1])
    return torch.stack([x[:, :, r0:r1, c0:c1].mean((2, 3)) for r0, r1 in rows for c0, c1 in cols], dim=2)


def agent_formula(q, k, v, A, kpm=None, bias=(None, None)):
    """V_A = softmax(A Kᵀ/√D + B_agg) V (padded keys excluded), O = softmax(Q Aᵀ/√D + B_bcast) V_A."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = A @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias[0] is not None:
        s = s + bias[0]
    if kpm is not None:
        s = s.masked_fill(~kpm[:, None, None, :], float("-inf"))
    va = torch.softmax(s, -1) @ v
    s2 = q @ A.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias[1] is not None:
        s2 = s2 + bias[1]
    return torch.softmax(s2, -1) @ va


def dwc(v, weight, grid=None):
    """nn.Conv1d/2d(C, C, k, padding=k//2, groups=C) on the channels (kv head, value dim)."""
    B, Hkv, N, Dv = v.shape
    C = Hkv * Dv
    x = v.permute(0, 1, 3, 2).reshape(B, C, N)
    if grid is None:
        y = F.conv1d(x, weight, padding=weight.shape[-1] // 2, groups=C)
    else:
        y = F.conv2d(x.reshape(B, C, *grid), weight, padding=weight.shape[-1] // 2, groups=C).reshape(B, C, N)
    return y.reshape(B, Hkv, Dv, N).permute(0, 1, 3, 2)


# ------------------------------------------------------------------------------- 1-D


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("Nq,Nk,n", [(37, 37, 16), (64, 64, 16), (5, 5, 16), (19, 40, 7), (50, 3, 4)])
def test_1d_is_paper_formula(impl, Nq, Nk, n):
    q, k, v = qkv(Hq=4, Hkv=2, Nq=Nq, Nk=Nk)
    got = az.attention(q, k, v, method="agent", impl=impl, num_agents=n)
    torch.testing.assert_close(got, agent_formula(q, k, v, agents_1d(q, n)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ksize", [3, 5])
def test_1d_dwc_term_is_conv1d(impl, ksize):
    q, k, v = qkv(Hq=4, Hkv=2, Nq=23, Nk=23)
    w = torch.randn(2 * 6, 1, ksize, dtype=torch.float64)
    got = az.attention(q, k, v, method="agent", impl=impl, num_agents=8, dwc_weight=w)
    expected = agent_formula(q, k, v, agents_1d(q, 8)) + dwc(v, w).repeat_interleave(2, 1)
    torch.testing.assert_close(got, expected)
    # a shared kernel (1, 1, k) is the same kernel on every channel
    shared = w[:1]
    got = az.attention(q, k, v, method="agent", impl=impl, num_agents=8, dwc_weight=shared)
    expected = agent_formula(q, k, v, agents_1d(q, 8)) + dwc(v, shared.expand(12, 1, ksize)).repeat_interleave(2, 1)
    torch.testing.assert_close(got, expected)


# ------------------------------------------------------------------------------- 2-D


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grid,num_agents,agent_grid", [((8, 8), 16, None), ((6, 10), 16, None), ((7, 5), 9, None),
                                                        ((6, 10), 16, (2, 3)), ((3, 2), 16, None)])
def test_2d_is_paper_formula_with_conv2d(impl, grid, num_agents, agent_grid):
    N = grid[0] * grid[1]
    q, k, v = qkv(Hq=4, Hkv=2, Nq=N, Nk=N)
    w = torch.randn(12, 1, 3, 3, dtype=torch.float64)
    ag = agent_grid or (math.isqrt(num_agents),) * 2
    A = agents_2d(q, grid, ag)
    got = az.attention(q, k, v, method="agent", impl=impl, grid=grid, num_agents=num_agents, agent_grid=agent_grid)
    torch.testing.assert_close(got, agent_formula(q, k, v, A))
    got = az.attention(q, k, v, method="agent", impl=impl, grid=grid, num_agents=num_agents, agent_grid=agent_grid,
                       dwc_weight=w)
    torch.testing.assert_close(got, agent_formula(q, k, v, A) + dwc(v, w, grid).repeat_interleave(2, 1))


@pytest.mark.parametrize("impl", IMPLS)
def test_2d_cross_pools_the_query_grid_and_skips_dwc(impl):
    q, k, v = qkv(Nq=24, Nk=17)
    w = torch.randn(12, 1, 3, 3, dtype=torch.float64)
    got = az.attention(q, k, v, method="agent", impl=impl, grid=(4, 6), num_agents=4, dwc_weight=w)
    torch.testing.assert_close(got, agent_formula(q, k, v, agents_2d(q, (4, 6), (2, 2))))


# ------------------------------------------------------------------ padding, bias, weights


@pytest.mark.parametrize("impl", IMPLS)
def test_padding_excludes_keys_and_zeroes_dwc_inputs(impl):
    q, k, v = qkv(Nq=20, Nk=20)
    kpm = torch.ones(2, 20, dtype=torch.bool)
    kpm[0, 15:] = False
    kpm[1, :4] = False
    w = torch.randn(12, 1, 3, dtype=torch.float64)
    got = az.attention(q, k, v, method="agent", impl=impl, num_agents=6, key_mask=kpm, dwc_weight=w)
    expected = agent_formula(q, k, v, agents_1d(q, 6), kpm) + dwc(v * kpm[:, None, :, None], w)
    torch.testing.assert_close(got, expected)
    # cross: padding equals removing the padded keys
    cross = az.attention(q[:, :, :9], k, v, method="agent", impl=impl, num_agents=6, key_mask=kpm)
    for b in range(2):
        keep = kpm[b]
        alone = az.attention(q[b:b + 1, :, :9], k[b:b + 1, :, keep], v[b:b + 1, :, keep], method="agent", impl=impl,
                             num_agents=6)
        torch.testing.assert_close(cross[b:b + 1], alone)


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_padded_sequence_gives_zeros(impl):
    q, k, v = qkv(Nq=12, Nk=12)
    kpm = torch.ones(2, 12, dtype=torch.bool)
    kpm[1] = False
    w = torch.randn(12, 1, 3, dtype=torch.float64)
    out = az.attention(q, k, v, method="agent", impl=impl, num_agents=4, key_mask=kpm, dwc_weight=w)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert out[0].abs().sum() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_agent_bias(impl):
    q, k, v = qkv(Nq=14, Nk=11)
    g = torch.Generator().manual_seed(5)
    b_agg = torch.randn(1, 2, 5, 11, generator=g, dtype=torch.float64)
    b_bcast = torch.randn(2, 1, 14, 5, generator=g, dtype=torch.float64)
    A = agents_1d(q, 5)
    got = az.attention(q, k, v, method="agent", impl=impl, num_agents=5, agent_bias=(b_agg, b_bcast))
    torch.testing.assert_close(got, agent_formula(q, k, v, A, bias=(b_agg, b_bcast)))
    got = az.attention(q, k, v, method="agent", impl=impl, num_agents=5, agent_bias=(None, b_bcast))
    torch.testing.assert_close(got, agent_formula(q, k, v, A, bias=(None, b_bcast)))


def test_weights_are_the_two_softmaxes_product():
    q, k, v = qkv(Nq=16, Nk=16)
    kpm = torch.ones(2, 16, dtype=torch.bool)
    kpm[1, 10:] = False
    out, w = az.attention(q, k, v, method="agent", num_agents=4, key_mask=kpm, return_weights=True)
    assert w.shape == (2, 2, 16, 16)
    torch.testing.assert_close(w @ v, out)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 16, dtype=torch.float64))
    assert torch.equal(w[1, :, :, 10:], torch.zeros_like(w[1, :, :, 10:]))
    assert torch.linalg.matrix_rank(w[0, 0]) <= 4  # rank <= number of agents


# ---------------------------------------------------------------------------- module


@pytest.mark.parametrize("grid", [None, (5, 6)])
def test_module_gradients_reach_the_dwc_weights(grid):
    torch.manual_seed(0)
    module = az.build("agent", heads=4, kv_heads=2, head_dim=8, v_dim=6, num_agents=4, grid=grid).double()
    assert module.dwc_weight.shape == ((12, 1, 3) if grid is None else (12, 1, 3, 3))
    q, k, v = qkv(Hq=4, Hkv=2, Nq=30, Nk=30)
    out = module(q, k, v)
    expected = agent_formula(q, k, v, agents_1d(q, 4) if grid is None else agents_2d(q, grid, (2, 2)))
    expected = expected + dwc(v, module.dwc_weight.detach(), grid).repeat_interleave(2, 1)
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    assert module.dwc_weight.grad is not None and module.dwc_weight.grad.abs().sum() > 0
    # the gradient of Σ out² w.r.t. the kernel, by finite differences on one entry
    idx = (3, 0) + (1,) * (module.dwc_weight.dim() - 2)
    with torch.no_grad():
        h = 1e-6
        module.dwc_weight[idx] += h
        up = module(q, k, v).square().sum()
        module.dwc_weight[idx] -= 2 * h
        down = module(q, k, v).square().sum()
        module.dwc_weight[idx] += h
    torch.testing.assert_close(module.dwc_weight.grad[idx], (up - down) / (2 * h), atol=1e-5, rtol=1e-5)


def test_module_skips_dwc_for_cross_attention():
    module = az.build("agent", heads=2, head_dim=8, v_dim=6, num_agents=4).double()
    q, k, v = qkv(Nq=12, Nk=12)
    A = agents_1d(q, 4)
    torch.testing.assert_close(module(q, k, v, cross=True), agent_formula(q, k, v, A))
    assert not torch.allclose(module(q, k, v), agent_formula(q, k, v, A))
    q.requires_grad_(True)
    out = module(q[:, :, :7], k, v)  # Nq != Nk: cross by default
    torch.testing.assert_close(out, agent_formula(q[:, :, :7], k, v, agents_1d(q[:, :, :7], 4)))
    out.sum().backward()
    assert module.dwc_weight.grad is None


def test_layer_on_a_grid_trains_the_dwc():
    attn = az.Attention(dim=32, heads=4, kv_heads=2, method="agent", grid=(4, 5), num_agents=4)
    x = torch.randn(2, 20, 32)
    attn(x).square().mean().backward()
    assert attn.attn.dwc_weight.grad.abs().sum() > 0


# ------------------------------------------------------------------ contract, with DWC


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("pattern", ["noncausal_self", "noncausal_cross"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_fast_matches_reference_with_the_dwc_term(case, pattern, dtype):
    """The contract's check (outputs and q/k/v gradients of the fast impl vs the
    reference, the fp64 three-way rule, awkward shapes) with the DWC term on: a shared
    3-tap kernel, the contract's former test option for agent."""
    spec = az.get("agent")
    q, k, v, kpm, dout = make_inputs(case, pattern)
    options = {**spec.sized_options(max(q.shape[2], k.shape[2])),
               "dwc_weight": torch.tensor([[[0.3, -0.5, 0.8]]])}
    low = [t.to(dtype) for t in (q, k, v)]
    cross = pattern.endswith("cross")
    ref64 = run(call("agent", "reference", False, kpm, cross, **options), q, k, v, dout)
    ref_low = run(call("agent", "reference", False, kpm, cross, **options), *low, dout)
    fast = run(call("agent", "agent", False, kpm, cross, **options), *low, dout)
    assert fast[0].dtype == dtype
    assert_three_way(fast, ref_low, ref64, spec.get_impl("agent").fudge or spec.fudge, dtype)
    if not cross:  # the DWC term is there (self-attention only)
        plain = {n: o for n, o in options.items() if n != "dwc_weight"}
        assert not torch.allclose(ref64[0], run(call("agent", "reference", False, kpm, cross, **plain), q, k, v,
                                                dout)[0])


# ------------------------------------------------------------------- errors, memory


def test_bad_options_raise():
    q, k, v = qkv(Nq=12, Nk=12)
    with pytest.raises(UnsupportedPattern, match="noncausal_self"):
        az.attention(q, k, v, method="agent", causal=True)
    with pytest.raises(AttentionInputError, match=r"grid=\(3, 5\) has 15 cells but q has Nq=12"):
        az.attention(q, k, v, method="agent", grid=(3, 5))
    with pytest.raises(AttentionInputError, match="perfect square.*num_agents=8"):
        az.attention(q, k, v, method="agent", grid=(3, 4), num_agents=8)
    with pytest.raises(AttentionInputError, match="num_agents must be a positive int"):
        az.attention(q, k, v, method="agent", num_agents=0)
    with pytest.raises(AttentionInputError, match=r"dwc_weight must have shape \(Hkv·Dv, 1, k\).*= 12.*got \(12, 3\)"):
        az.attention(q, k, v, method="agent", dwc_weight=torch.randn(12, 3, dtype=torch.float64))
    with pytest.raises(AttentionInputError, match=r"dwc_weight must have shape \(Hkv·Dv, 1, kh, kw\)"):
        az.attention(q, k, v, method="agent", grid=(3, 4), num_agents=4, dwc_weight=torch.randn(12, 1, 3))
    with pytest.raises(AttentionInputError, match=r"agent_bias\[0\] of shape \(2, 3\) does not broadcast"):
        az.attention(q, k, v, method="agent", agent_bias=(torch.randn(2, 3), None))


def test_sizing_hook_keeps_agents_a_quarter_of_short_sequences():
    spec = az.get("agent")
    assert spec.sized_options(1) == {"num_agents": 4}
    assert spec.sized_options(40) == {"num_agents": 9}
    assert spec.sized_options(64) == spec.sized_options(4096) == {"num_agents": spec.options["num_agents"]}
    # always a perfect square, so the sized options also serve a 2-D call on any grid
    g = torch.Generator().manual_seed(0)
    for (h, w) in ((1, 1), (2, 3), (7, 9), (5, 8), (8, 8)):
        options = spec.sized_options(h * w)
        assert math.isqrt(options["num_agents"]) ** 2 == options["num_agents"]
        q = torch.randn(1, 2, h * w, 8, generator=g, dtype=torch.float64)
        for impl in spec.impl_names:
            out = az.attention(q, q, q, method="agent", impl=impl, grid=(h, w), **options)
            assert out.shape == q.shape and torch.isfinite(out).all()


def test_fast_never_saves_an_n_by_n_tensor():
    N = 1024
    q, k, v = (t.requires_grad_(True) for t in qkv(B=1, Hq=1, Hkv=1, Nq=N, Nk=N, D=8, Dv=8, dtype=torch.float32))
    w = torch.randn(8, 1, 3)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        az.attention(q, k, v, method="agent", impl="agent", dwc_weight=w).sum().backward()
    assert 0 < max(sizes) < N * N // 16
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        az.attention(q, k, v, method="agent", impl="reference", dwc_weight=w).sum()
    assert max(sizes) >= N * N  # the check sees the reference's N×N matrix

"""The contract every registered method is tested against, generated from the registry:
a method is covered the moment it is registered (see DESIGN.md)."""

from __future__ import annotations

import copy

import pytest
import torch

import attnzoo as az
from attnzoo import decoding
from attnzoo.errors import AttentionInputError, UnsupportedImpl, UnsupportedPattern
from attnzoo.registry import PATTERNS, MethodSpec

from helpers import CASES, assert_three_way, call, make_inputs, run

SPECS = az.list_methods()
DTYPES = [torch.float32, torch.bfloat16]


def sized(spec, *lengths) -> dict:
    """The spec's own options for inputs of these lengths (its sizing hook)."""
    return spec.sized_options(max(lengths))


def _fast_grid():
    for spec in SPECS:
        for impl in spec.impls:
            for pattern in spec.patterns:
                for case in CASES:
                    for dtype in DTYPES:
                        yield pytest.param(spec.name, impl.name, pattern, case, dtype,
                                           id=f"{spec.name}-{impl.name}-{pattern}-{case.name}-{str(dtype)[6:]}")


@pytest.mark.parametrize("method,impl,pattern,case,dtype", list(_fast_grid()))
def test_fast_matches_reference(method, impl, pattern, case, dtype):
    """Outputs and q/k/v gradients of every fast impl vs the reference, by the fp64 three-way rule."""
    spec = az.get(method)
    causal, cross = pattern.startswith("causal"), pattern.endswith("cross")
    q, k, v, kpm, dout = make_inputs(case, pattern)
    if spec.query == "learned":  # one learned query per head; outputs one row per key
        q = q[:, :, :1]
    options = sized(spec, q.shape[2], k.shape[2])
    if case.q_heads != case.kv_heads and not spec.gqa:
        with pytest.raises(AttentionInputError, match="heads"):
            az.attention(q, k, v, method=method, impl=impl, causal=causal, cross=cross, **options)
        return
    low = [t.to(dtype) for t in (q, k, v)]
    info = spec.check(*[t.requires_grad_(True) for t in low], causal=causal, key_mask=kpm, cross=cross,
                      **options)
    reason = spec.why_not(spec.get_impl(impl), info)
    if reason is not None:  # e.g. FlexAttention on CPU with autograd: it must say so, never run silently
        with pytest.raises(UnsupportedImpl, match=impl):
            az.attention(*low, method=method, impl=impl, causal=causal, key_mask=kpm, cross=cross, **options)
        return
    ref64 = run(call(method, "reference", causal, kpm, cross, **options), q, k, v, dout)
    ref_low = run(call(method, "reference", causal, kpm, cross, **options), *low, dout)
    fast = run(call(method, impl, causal, kpm, cross, **options), *low, dout)
    assert fast[0].dtype == dtype
    assert_three_way(fast, ref_low, ref64, spec.get_impl(impl).fudge or spec.fudge, dtype)


@pytest.mark.parametrize("method", [s.name for s in SPECS if s.exact and s.masks])
def test_causal_equals_explicit_lower_triangular_mask(method):
    """Exact methods: causal=True equals an explicit lower-triangular mask, in every impl."""
    spec = az.get(method)
    q, k, v, _, _ = make_inputs(CASES[1], "causal_self", dtype=torch.float32)
    n = q.shape[2]
    tril = torch.ones(n, n, dtype=torch.bool).tril()
    options = sized(spec, n)
    a = az.attention(q, k, v, method=method, causal=True, impl="reference", **options)
    for impl in spec.impl_names:
        b = az.attention(q, k, v, method=method, mask=tril, impl=impl, **options)
        torch.testing.assert_close(a, b)


def _decode_grid():
    for spec in SPECS:
        if spec.decoding:
            for dtype in (torch.float64, torch.float32):
                yield pytest.param(spec.name, dtype, id=f"{spec.name}-{str(dtype)[6:]}")


@pytest.mark.parametrize("method,dtype", list(_decode_grid()))
def test_decoding_equals_causal_forward(method, dtype):
    """Token-by-token ``step`` (after a 7-token chunked prefill) equals the causal forward."""
    spec = az.get(method)
    B, Hq, Hkv, N, D, Dv = 2, 4, 2, 45, 16, 12
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, Hq, N, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, N, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, N, Dv, generator=g, dtype=dtype)
    learned = spec.query == "learned"
    if learned:
        q = q[:, :, :1]
    options = sized(spec, N)
    full = az.attention(q, k, v, method=method, causal=True, **options)
    state = decoding.init_state(method, B, Hkv, D, Dv, dtype=dtype, **options)

    def queries(sl):
        return q if learned else q[:, :, sl]

    outs = [decoding.step(method, state, queries(slice(0, 7)), k[:, :, :7], v[:, :, :7], **options)]
    for t in range(7, N):
        sl = slice(t, t + 1)
        outs.append(decoding.step(method, state, queries(sl), k[:, :, sl], v[:, :, sl], **options))
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(torch.cat(outs, dim=2), full, atol=tol, rtol=tol)


def test_every_unsupported_pattern_raises():
    """For every method and every pattern its spec does not claim, the call raises
    UnsupportedPattern naming the supported ones; checked on a stand-in method too, so
    the mechanism is tested even while every registered method supports all patterns."""

    def ref(q, k, v, call):
        return az.get("softmax").reference(q, k, v, call)

    standin = MethodSpec(name="_selfonly", family="test", summary="", paper="", reference=ref,
                         patterns=("noncausal_self",))
    specs = SPECS + [standin]
    checked = 0
    for spec in specs:
        for pattern in PATTERNS:
            if pattern in spec.patterns:
                continue
            causal, cross = pattern.startswith("causal"), pattern.endswith("cross")
            nq = 1 if spec.query == "learned" else 5
            q, k, v = torch.randn(1, 2, nq, 8), torch.randn(1, 2, 7 if cross else 5, 8), torch.randn(1, 2, 7 if cross else 5, 8)
            with pytest.raises(UnsupportedPattern, match=spec.patterns[0]):
                spec.check(q, k, v, causal=causal, cross=cross)
            checked += 1
    assert checked >= 3


def test_no_decoding_raises(monkeypatch):
    """A method without a causal form refuses init_state/step (registered methods and a stand-in)."""
    from attnzoo import registry

    standin = MethodSpec(name="_nodecode", family="test", summary="", paper="",
                         reference=az.get("softmax").reference)
    monkeypatch.setitem(registry._REGISTRY, "_nodecode", standin)
    for spec in SPECS + [standin]:
        if not spec.decoding:
            with pytest.raises(UnsupportedPattern, match="decoding"):
                decoding.init_state(spec.name, 1, 1, 8, 8)
            with pytest.raises(UnsupportedPattern, match="decoding"):
                decoding.step(spec.name, None, *(torch.randn(1, 1, 1, 8),) * 3)


def _module_grid():
    """Learnable methods x fast impls x (causal self, noncausal cross) where supported,
    else the method's first pattern."""
    for spec in SPECS:
        if spec.module is None:
            continue
        patterns = [p for p in ("causal_self", "noncausal_cross") if p in spec.patterns] or [spec.patterns[0]]
        for impl in spec.impls:
            for pattern in patterns:
                yield pytest.param(spec.name, impl.name, pattern, id=f"{spec.name}-{impl.name}-{pattern}")


@pytest.mark.parametrize("method,impl,pattern", list(_module_grid()))
def test_learnable_module_fast_matches_reference(method, impl, pattern):
    """Methods with parameters: fast vs reference in outputs and gradients of q, k, v
    *and the parameters*, by the three-way rule, with non-trivial parameter values."""
    case = CASES[2]
    q, k, v, kpm, dout = make_inputs(case, pattern)
    causal, cross = pattern.startswith("causal"), pattern.endswith("cross")
    module = az.build(method, heads=case.q_heads, kv_heads=case.kv_heads, head_dim=case.head_dim,
                      v_dim=case.v_dim or case.head_dim)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    mod64 = copy.deepcopy(module).double()

    def results(mod, impl_name, dtype):
        params = list(mod.parameters())
        fn = lambda a, b, c: mod(a, b, c, causal=causal, cross=cross, impl=impl_name)  # noqa: E731
        return run(fn, q.to(dtype), k.to(dtype), v.to(dtype), dout, params)

    names = ("out", "dq", "dk", "dv") + tuple(n for n, _ in module.named_parameters())
    assert_three_way(results(module, impl, torch.float32), results(module, "reference", torch.float32),
                     results(mod64, "reference", torch.float64),
                     az.get(method).get_impl(impl).fudge or az.get(method).fudge, torch.float32, names)


def test_every_spec_is_complete():
    for spec in SPECS:
        assert spec.patterns and set(spec.patterns) <= set(PATTERNS)
        assert spec.paper and spec.summary and spec.time and spec.memory
        assert spec.impls, f"{spec.name} has no fast implementation"
        if spec.decoding:
            assert spec.state_size, f"{spec.name}: its decoder has no state_size"
        row = spec.row()
        assert row["method"] == spec.name
        for impl in spec.impls:
            assert impl.description, f"{spec.name}:{impl.name} has no description"


@pytest.mark.parametrize("method", [s.name for s in SPECS if s.exact])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_exact_methods_equal_torch_sdpa(method, pattern):
    """Every method that claims exactness equals F.scaled_dot_product_attention, in every
    impl that can serve the call (lower-right causal alignment built independently)."""
    import torch.nn.functional as F

    spec = az.get(method)
    causal, cross = pattern.startswith("causal"), pattern.endswith("cross")
    q, k, v, kpm, _ = make_inputs(CASES[4], pattern, dtype=torch.float32)
    nq, nk = q.shape[2], k.shape[2]
    allowed = kpm[:, None, None, :].expand(-1, 1, nq, -1).clone()
    if causal:
        allowed &= torch.ones(nq, nk, dtype=torch.bool).tril(diagonal=nk - nq)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    expected = expected.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    for impl in spec.impl_names:
        info = spec.check(q, k, v, causal=causal, key_mask=kpm, cross=cross)
        if spec.why_not(spec.get_impl(impl), info) is not None:
            continue
        out = az.attention(q, k, v, method=method, impl=impl, causal=causal, key_mask=kpm, cross=cross)
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5, msg=f"{method}:{impl}")


def _causal_specs():
    for spec in SPECS:
        if any(p.startswith("causal") for p in spec.patterns):
            yield pytest.param(spec.name, id=spec.name)


@pytest.mark.parametrize("method", list(_causal_specs()))
def test_causal_forms_are_causal_or_say_why_not(method):
    """Redraw every input after a position: the outputs up to it must not move, unless
    the spec declares (``causal_leak``) that the method's key selection sees later
    tokens — and then the probe must find it, so the declaration stays true."""
    from attnzoo.bench.check import causal_leak

    spec = az.get(method)
    leaks = {}
    for p in spec.patterns:
        for impl in spec.impl_names:
            if p.startswith("causal"):
                try:
                    leaks[(p, impl)] = causal_leak(method, p, impl)
                except UnsupportedImpl:  # FlexAttention on CPU takes no float64: the probe's other impls do
                    continue
    assert ("causal_self" if "causal_self" in spec.patterns else "causal_cross", "reference") in leaks
    if spec.causal_leak:
        assert max(leaks.values()) > 1e-3, f"{method} declares causal_leak but no probe finds one"
    else:
        bad = {key: d for key, d in leaks.items() if d > 1e-9}
        assert not bad, f"outputs change when only later inputs change: {bad}"


# --------------------------------------------------------------------------- masks


def _mask_grid():
    for spec in SPECS:
        if not spec.masks:
            continue
        for impl in spec.impls:
            for pattern in spec.patterns:
                for kind in ("dense", "mask_mod"):
                    yield pytest.param(spec.name, impl.name, pattern, kind,
                                       id=f"{spec.name}-{impl.name}-{pattern}-{kind}")


def _test_mask(kind: str, q_len: int, kv_len: int, batch: int, heads: int):
    """A dense bool mask with a few fully masked rows, or a mask_mod (a block-diagonal
    document mask with a per-head stride): both hide most keys of some queries."""
    if kind == "dense":
        g = torch.Generator().manual_seed(3)
        m = torch.rand(batch, heads, q_len, kv_len, generator=g) < 0.7
        m[:, :, ::17] = False  # some queries see nothing: zeros, never NaN
        return m
    docs_q = torch.arange(q_len) * 3 // q_len
    docs_k = torch.arange(kv_len) * 3 // kv_len

    def documents_with_stride(b, h, q_idx, kv_idx):
        return (docs_q[q_idx] == docs_k[kv_idx]) | ((kv_idx % (h + 2)) == 0)

    return documents_with_stride


@pytest.mark.parametrize("method,impl,pattern,kind", list(_mask_grid()))
def test_fast_matches_reference_with_masks(method, impl, pattern, kind):
    """Every method that takes masks: each fast impl equals the reference under a dense
    bool mask and under a mask_mod (outputs and q/k/v gradients, the three-way rule)."""
    spec = az.get(method)
    causal, cross = pattern.startswith("causal"), pattern.endswith("cross")
    case = CASES[2] if spec.gqa else CASES[1]
    q, k, v, kpm, dout = make_inputs(case, pattern)
    mask = _test_mask(kind, q.shape[2], k.shape[2], q.shape[0], q.shape[1])
    options = {**sized(spec, q.shape[2], k.shape[2]), "mask": mask}
    low = [t.float() for t in (q, k, v)]
    info = spec.check(*[t.clone().requires_grad_(True) for t in low], causal=causal, cross=cross, **options)
    reason = spec.why_not(spec.get_impl(impl), info)
    if reason is not None:
        with pytest.raises(UnsupportedImpl, match=impl):
            az.attention(*low, method=method, impl=impl, causal=causal, cross=cross, **options)
        return
    ref64 = run(call(method, "reference", causal, None, cross, **options), q, k, v, dout)
    ref32 = run(call(method, "reference", causal, None, cross, **options), *low, dout)
    fast = run(call(method, impl, causal, None, cross, **options), *low, dout)
    assert_three_way(fast, ref32, ref64, spec.get_impl(impl).fudge or spec.fudge, torch.float32)

"""The quick correctness check every method passes before it is timed.

On a small input, the implementation the benchmark will time (``impl="auto"`` resolves
to the same fast path it picks for the timed call) is compared with the method's
reference in outputs and q/k/v gradients (and parameter gradients for methods with
parameters), by the rule of PyTorch's FlexAttention tests that the test suite uses:

    err(fast_fp32, ref_fp64) <= fudge * err(ref_fp32, ref_fp64) + floor

with a floor of ``REL_FLOOR`` times the tensor's scale.

A method that fails is reported as failing and its timings are not taken: a fast path
that is fast because it is wrong is not a result.
"""

from __future__ import annotations

import copy

import torch

from .. import registry
from ..errors import UnsupportedImpl

#: The floor of the rule, relative to the tensor's scale. Looser than the test suite's
#: two ulps: a parameter gradient sums over every position, and sdpa's fp32 sums can
#: differ from the reference's by ~1e-5 relative. This check is there to catch wrong
#: results (errors of order 1e-2 and up); the test suite holds the tight rule.
REL_FLOOR = 1e-4

#: the check's input: B=1, 2 query heads, 2 kv heads, N=80 queries (cross: 56 keys), D=32
CHECK_SHAPE = dict(batch=1, heads=2, q_len=80, kv_len=56, head_dim=32)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def quick_check(method: str, impl: str, pattern: str, options: tuple = ()) -> dict:
    """Fast impl vs reference on one small input, outputs and gradients.

    Returns ``{"status": "ok"|"failed", "impl_used", "out_error", "grad_error",
    "tolerance", "message"}``: errors are max |fast - fp64 reference| (outputs, and the
    largest over gradients); tolerance the bound the rule allowed for the output.
    ``options`` are the method's options as ``(name, value)`` pairs; the spec's sized
    options for the check's length fill in the ones not given.
    """
    from ..api import attention

    spec = registry.get(method)
    causal, cross = pattern.startswith("causal"), pattern.endswith("cross")
    s = CHECK_SHAPE
    nq = s["q_len"]
    nk = s["kv_len"] if cross else nq
    g = torch.Generator().manual_seed(0)
    q = torch.randn(s["batch"], s["heads"], 1 if spec.query == "learned" else nq, s["head_dim"], generator=g,
                    dtype=torch.float64)
    k = torch.randn(s["batch"], s["heads"], nk, s["head_dim"], generator=g, dtype=torch.float64)
    v = torch.randn(s["batch"], s["heads"], nk, s["head_dim"], generator=g, dtype=torch.float64)
    sized = spec.sized_options(max(nq, nk))
    if spec.module is not None:
        module, options = _build_module(spec, {**spec.split_module_options(sized)[0], **dict(options)}, s["heads"],
                                        s["head_dim"], g)
        module64 = copy.deepcopy(module).double()
        # the impl the module's call resolves to (its options are tensors it makes itself)
        info = spec.check(q.float().requires_grad_(True), k.float(), v.float(), causal=causal, cross=cross)
        used = spec.select(impl, info).name if spec.impls else impl

        def run(which, dtype):
            mod = module64 if dtype == torch.float64 else module
            params = list(mod.parameters())
            a, b, c = (t.to(dtype).requires_grad_(True) for t in (q, k, v))
            out = mod(a, b, c, causal=causal, cross=cross, impl=which, nan_policy="propagate", **options)
            grads = torch.autograd.grad(out, (a, b, c, *params), dout.to(out.dtype), allow_unused=True)
            return [out.detach()] + [torch.zeros(()) if gr is None else gr for gr in grads]
    else:
        options = {**sized, **dict(options)}
        info = spec.check(q.float().requires_grad_(True), k.float(), v.float(), causal=causal, cross=cross, **options)
        used = spec.select(impl, info).name

        def run(which, dtype):
            a, b, c = (t.to(dtype).requires_grad_(True) for t in (q, k, v))
            out = attention(a, b, c, method=method, impl=which, causal=causal, cross=cross,
                            nan_policy="propagate", **options)
            return [out.detach()] + list(torch.autograd.grad(out, (a, b, c), dout.to(out.dtype)))

    # a learned-query method (aaren) outputs one row per key
    dout = torch.randn(s["batch"], s["heads"], nk if spec.query == "learned" else nq, s["head_dim"],
                       generator=g, dtype=torch.float64)
    ref64 = run("reference", torch.float64)
    ref32 = run("reference", torch.float32)
    fast = run(used, torch.float32)
    fudge = (spec.get_impl(used).fudge if used in spec.impl_names else None) or spec.fudge
    failures, errors, tolerance = [], [], None
    for i, (f, r, t) in enumerate(zip(fast, ref32, ref64)):
        name = ("out", "dq", "dk", "dv")[i] if i < 4 else f"param{i - 4}"
        if f.shape != t.shape:
            failures.append(f"{name}: shape {tuple(f.shape)} != reference {tuple(t.shape)}")
            continue
        if not torch.isfinite(f).all():
            failures.append(f"{name}: non-finite values")
            continue
        floor = REL_FLOOR * max(float(t.abs().max()) if t.numel() else 0.0, 1.0)
        err_fast, err_ref = _max_err(f, t), _max_err(r, t)
        bound = fudge * err_ref + floor
        errors.append(err_fast)
        if i == 0:
            tolerance = bound
        if err_fast > bound:
            failures.append(f"{name}: err(fast)={err_fast:.3e} > {fudge} * err(ref)={err_ref:.3e} + {floor:.1e}")
    leak = causal_leak(method, pattern, used, tuple(options.items())) if causal else None
    return {
        "status": "failed" if failures else "ok",
        "causal_leak": leak,  # outputs' change when only later inputs change (causal patterns)
        "impl_used": used,
        "out_error": errors[0] if errors else None,
        "grad_error": max(errors[1:]) if len(errors) > 1 else None,
        "tolerance": tolerance,
        "message": "; ".join(failures) or None,
    }


def _build_module(spec, options: dict, heads: int, head_dim: int, generator, dtype=torch.float32):
    """A method's module with non-trivial parameters, and the options left for its call."""
    from .efficiency import split_module_options

    built, options = split_module_options(spec, options)
    module = spec.module(heads=heads, kv_heads=heads, head_dim=head_dim, **built)
    with torch.no_grad():  # non-trivial parameters, so the parameter paths are exercised
        for p in module.parameters():
            p.normal_(0, 0.3, generator=generator)
    return module.to(dtype), options


#: (seq_len, split, small blocks) probes: a selection can look causal at one size and not at another
LEAK_PROBES = ((96, 53, True), (256, 150, False), (64, 37, True), (96, 53, False))


def causal_leak(method: str, pattern: str = "causal_self", impl: str = "reference", options: tuple = ()) -> float:
    """The largest :func:`causal_leak_at` over :data:`LEAK_PROBES`: 0 for a strictly causal
    method. A probe the named fast impl cannot serve (one sized for short inputs, e.g.
    tensor's ``dense`` at N = 256) is left out; if it serves none, the error says so."""
    leaks, refused = [], []
    for n, split, small in LEAK_PROBES:
        try:
            leaks.append(causal_leak_at(method, pattern, impl, options, n, split, small))
        except UnsupportedImpl as e:
            if impl == "reference":
                raise
            refused.append(f"N={n}: {e}")
    if not leaks:
        raise UnsupportedImpl(f"impl={impl!r} of {method!r} serves none of the causal-leak probes ({'; '.join(refused)})")
    return max(leaks)


def causal_leak_at(method: str, pattern: str = "causal_self", impl: str = "reference", options: tuple = (),
                   seq_len: int = 96, split: int = 53, small_blocks: bool = True) -> float:
    """How much the causal form's outputs at positions ``<= split`` change when every
    input after ``split`` is redrawn (queries after it, and keys/values after its
    aligned position): 0 for a strictly causal method. float64, random inputs (and
    random parameters for methods with parameters); ``options`` fill in over the
    spec's sized options for ``seq_len``, with small blocks (``block_size=8, topk=2`` where the
    method has them) so that a block selection really chooses among many blocks."""
    from ..api import attention

    spec = registry.get(method)
    takes = spec.impl_options(spec.get_impl(impl)) if impl in spec.impl_names else spec.options  # impl-only ones
    small = {n: v for n, v in (("block_size", 8), ("topk", 2)) if n in takes and small_blocks}
    options = tuple({**small, **dict(options)}.items())
    if not pattern.startswith("causal") or pattern not in spec.patterns:
        raise ValueError(f"{method} has no {pattern} form to probe")
    cross = pattern.endswith("cross")
    g = torch.Generator().manual_seed(0)
    H, D = 2, 32
    nq, nk = seq_len, (seq_len * 3) // 4 if cross else seq_len
    off = nk - nq
    learned = spec.query == "learned"
    q = torch.randn(1, H, 1 if learned else nq, D, generator=g, dtype=torch.float64)
    k = torch.randn(1, H, nk, D, generator=g, dtype=torch.float64)
    v = torch.randn(1, H, nk, D, generator=g, dtype=torch.float64)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    if not learned:
        q2[:, :, split + 1:] = torch.randn(q2[:, :, split + 1:].shape, generator=g, dtype=torch.float64)
    for t in (k2, v2):
        t[:, :, split + 1 + off:] = torch.randn(t[:, :, split + 1 + off:].shape, generator=g, dtype=torch.float64)
    sized = spec.sized_options(seq_len)
    if spec.module is not None:
        module, opts = _build_module(spec, {**spec.split_module_options(sized)[0], **dict(options)}, H, D, g, torch.float64)

        def run(a, b, c):
            return module(a, b, c, causal=True, cross=cross, impl=impl, **opts)
    else:
        opts = {**sized, **dict(options)}

        def run(a, b, c):
            return attention(a, b, c, method=method, causal=True, cross=cross, impl=impl, **opts)

    rows = split + 1 + (off if learned else 0)  # a learned-query method outputs one row per key
    with torch.no_grad():
        return float((run(q, k, v)[:, :, :rows] - run(q2, k2, v2)[:, :, :rows]).abs().max())


def check_error(message: str) -> dict:
    """The result of a check that could not run."""
    return {"status": "error", "causal_leak": None, "impl_used": None, "out_error": None, "grad_error": None,
            "tolerance": None, "message": message}


def check_all(items: list) -> list:
    """Run :func:`quick_check` for each ``(method, impl, pattern, options)``; an exception
    becomes ``status="error"`` so one broken method does not stop the others."""
    out = []
    for method, impl, pattern, options in items:
        try:
            out.append(quick_check(method, impl, pattern, options))
        except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
            out.append(check_error(f"{type(e).__name__}: {e}"))
    return out

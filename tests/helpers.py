"""Shared test machinery: input cases and the fp64 three-way comparison rule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import attnzoo as az


@dataclass(frozen=True)
class Case:
    """One input shape. ``q_len``/``kv_len`` are used for cross patterns; self patterns
    use ``q_len`` for both."""

    name: str
    batch: int = 1
    q_heads: int = 2
    kv_heads: int = 2
    q_len: int = 63
    kv_len: int = 63
    head_dim: int = 32
    v_dim: Optional[int] = None
    padding: bool = False

    def lengths(self, pattern: str):
        return (self.q_len, self.kv_len) if pattern.endswith("cross") else (self.q_len, self.q_len)


CASES = [
    Case("n1", q_len=1, kv_len=37, head_dim=16),
    Case("n63", batch=2, q_len=63, kv_len=100),
    Case("n100_d60_gqa", q_heads=4, kv_heads=2, q_len=100, kv_len=63, head_dim=60, v_dim=24),
    Case("n1000", q_len=1000, kv_len=700, head_dim=32),
    Case("mqa_padding", batch=2, q_heads=4, kv_heads=1, q_len=77, kv_len=120, padding=True),
]


def make_inputs(case: Case, pattern: str, dtype=torch.float64, seed: int = 0):
    """q, k, v (float64), a key mask (True = real key) or None, and an upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    nq, nk = case.lengths(pattern)
    dv = case.v_dim or case.head_dim
    q = torch.randn(case.batch, case.q_heads, nq, case.head_dim, generator=g, dtype=dtype)
    k = torch.randn(case.batch, case.kv_heads, nk, case.head_dim, generator=g, dtype=dtype)
    v = torch.randn(case.batch, case.kv_heads, nk, dv, generator=g, dtype=dtype)
    kpm = None
    if case.padding:
        kpm = torch.ones(case.batch, nk, dtype=torch.bool)
        kpm[-1, nk - nk // 3 :] = False  # the last sequence is padded by a third
    dout = torch.randn(case.batch, case.q_heads, nq, dv, generator=g, dtype=dtype)
    return q, k, v, kpm, dout


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def run(fn, q, k, v, dout, params=()):
    """Output and gradients of q, k, v (and params) for one call."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v, *params), dout.to(out.dtype), allow_unused=True)
    grads = [torch.zeros(()) if g is None else g for g in grads]
    return [out.detach(), *grads]


def assert_three_way(fast, ref_low, ref64, fudge: float, dtype, names=("out", "dq", "dk", "dv")):
    """PyTorch's rule: ``err(fast, ref64) <= fudge * err(ref_low, ref64) + floor``.

    The floor (two ulps of the dtype at unit scale, or at the tensor's scale if larger)
    covers tensors the low-precision reference gets exactly right by symmetry (with
    N = 1 softmax is the identity and dq is exactly 0, which the blocked backward
    reproduces only up to rounding).
    """
    eps = torch.finfo(dtype).eps
    for name, f, r, t in zip(names, fast, ref_low, ref64):
        assert f.shape == t.shape, f"{name}: shape {tuple(f.shape)} != reference {tuple(t.shape)}"
        assert torch.isfinite(f).all(), f"{name}: non-finite values in the fast result"
        scale = float(t.abs().max()) if t.numel() else 0.0
        floor = 2 * eps * max(scale, 1.0)
        err_fast, err_ref = max_err(f, t), max_err(r, t)
        assert err_fast <= fudge * err_ref + floor, (
            f"{name}: err(fast)={err_fast:.3e} > {fudge} * err(ref)={err_ref:.3e} + {floor:.1e}"
        )


def call(method: str, impl: str, causal: bool, kpm, cross: bool, **options):
    def fn(q, k, v):
        return az.attention(q, k, v, method=method, impl=impl, causal=causal, key_mask=kpm, cross=cross,
                            **options)

    return fn


def contract_check(method, impl, pattern, options, case=CASES[2], dtype=torch.float32):
    """The contract's fast-vs-reference comparison (outputs and q/k/v gradients by the
    fp64 three-way rule) on one case: raises AssertionError on a mismatch."""
    spec = az.get(method)
    causal, cross = pattern.startswith("causal"), pattern.endswith("cross")
    q, k, v, kpm, dout = make_inputs(case, pattern)
    low = [t.to(dtype) for t in (q, k, v)]
    ref64 = run(call(method, "reference", causal, kpm, cross, **options), q, k, v, dout)
    ref_low = run(call(method, "reference", causal, kpm, cross, **options), *low, dout)
    fast = run(call(method, impl, causal, kpm, cross, **options), *low, dout)
    assert_three_way(fast, ref_low, ref64, spec.get_impl(impl).fudge or spec.fudge, dtype)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces (forward and
    backward): the probe the no-N×N tests use."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out

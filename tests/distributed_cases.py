"""The cases of tests/test_distributed.py and the functions its worker processes run.

Kept apart from the test file so the workers import only torch and attnzoo (already
loaded in the fork server), not pytest.
"""

from __future__ import annotations

import torch

from attnzoo import distributed as azd
from attnzoo.distributed import SequenceLayout, comm

N = 23  # uneven over 2 and 4 ranks and over the 4 / 8 zig-zag chunks
SHAPE = dict(batch=2, q_heads=4, kv_heads=2, head_dim=8, v_dim=6)

#: (case id, path, method, options, causal, layout)
CASES = [
    ("ring-noncausal-contiguous", "ring", "softmax", {}, False, "contiguous"),
    ("ring-causal-contiguous", "ring", "softmax", {}, True, "contiguous"),
    ("ring-noncausal-zigzag", "ring", "softmax", {}, False, "zigzag"),
    ("ring-causal-zigzag", "ring", "softmax", {}, True, "zigzag"),
    # Dv == D: the pairs run on torch's fused CPU flash kernel (Dv != D above: the PyTorch blocks)
    ("ring-noncausal-contiguous-fused", "ring", "softmax", {}, False, "contiguous"),
    ("ring-causal-zigzag-fused", "ring", "softmax", {}, True, "zigzag"),
    ("ring-causal-contiguous-fused", "ring", "softmax", {}, True, "contiguous"),
    ("ulysses-softmax-causal-zigzag", "ulysses", "softmax", {}, True, "zigzag"),
    ("ulysses-softmax-alibi-noncausal", "ulysses", "softmax", {"alibi": True}, False, "contiguous"),
    ("ulysses-sigmoid-causal", "ulysses", "sigmoid", {}, True, "contiguous"),
    ("ulysses-window-causal", "ulysses", "sliding_window", {"window": 5}, True, "contiguous"),
    ("ulysses-linear-noncausal", "ulysses", "linear", {}, False, "contiguous"),
    ("lasp2-lightning-causal", "lasp2", "lightning", {"chunk": 4}, True, "contiguous"),
    ("lasp2-lightning-decay-zigzag", "lasp2", "lightning", {"decay": 0.8, "chunk": 3}, True, "zigzag"),
    ("lasp2-lightning-nonorm", "lasp2", "lightning", {"output_norm": False, "feature_map": "silu"}, True,
     "contiguous"),
    ("lasp2-linear-causal", "lasp2", "linear", {"chunk": 4}, True, "contiguous"),
    ("lasp2-linear-noncausal", "lasp2", "linear", {"feature_map": "relu"}, False, "contiguous"),
    ("lasp2-linear-cosformer-causal", "lasp2", "linear", {"feature_map": "cosformer"}, True, "zigzag"),
    ("lasp2-linear-rms-noncausal", "lasp2", "linear", {"normalize": False}, False, "zigzag"),
    ("allgather-causal", "allgather", "softmax", {}, True, "contiguous"),
    ("allgather-causal-zigzag-softcap", "allgather", "softmax", {"softcap": 5.0}, True, "zigzag"),
    ("allgather-noncausal", "allgather", "softmax", {}, False, "contiguous"),
    ("halo-window-causal", "halo", "sliding_window", {"window": 5}, True, "contiguous"),
    ("halo-window-noncausal", "halo", "sliding_window", {"window": 6}, False, "contiguous"),
    ("halo-window-sinks-causal", "halo", "sliding_window", {"window": 4, "sinks": 2}, True, "contiguous"),
    ("halo-window-sinks-noncausal-zigzag", "halo", "sliding_window", {"window": 4, "sinks": 3}, False, "zigzag"),
    ("halo-window-wide-causal", "halo", "sliding_window", {"window": 14}, True, "contiguous"),
    ("halo-neighborhood-noncausal", "halo", "neighborhood", {"kernel_size": 5}, False, "contiguous"),
    ("halo-neighborhood-dilated", "halo", "neighborhood", {"kernel_size": 3, "dilation": 3}, False, "contiguous"),
    ("halo-neighborhood-causal-dilated", "halo", "neighborhood", {"kernel_size": 4, "dilation": 2}, True,
     "zigzag"),
]
IDS = [c[0] for c in CASES]


def v_dim_of(case_id: str) -> int:
    return SHAPE["head_dim"] if case_id.endswith("-fused") else SHAPE["v_dim"]


def full_inputs(seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, D = (SHAPE[k] for k in ("batch", "q_heads", "kv_heads", "head_dim"))
    Dv = v_dim_of(CASES[seed][0]) if seed < len(CASES) else SHAPE["v_dim"]
    q = torch.randn(B, Hq, N, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, N, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, N, Dv, generator=g, dtype=dtype)
    do = torch.randn(B, Hq, N, Dv, generator=g, dtype=dtype)
    return q, k, v, do


def run_path(path, q, k, v, *, method, causal, layout, options):
    if path == "ring":
        return azd.ring_attention(q, k, v, causal=causal, layout=layout)
    if path == "ulysses":
        return azd.ulysses_attention(q, k, v, method=method, causal=causal, layout=layout, **options)
    if path == "lasp2":
        return azd.lasp2(q, k, v, method=method, causal=causal, layout=layout, **options)
    if path == "allgather":
        return azd.allgather_attention(q, k, v, method=method, causal=causal, layout=layout, **options)
    return azd.halo_attention(q, k, v, method=method, causal=causal, layout=layout, **options)


def formula(case_id, path, method, options, causal, lay, rank):
    s = SHAPE
    kw = dict(batch=s["batch"], kv_heads=s["kv_heads"], head_dim=s["head_dim"], v_dim=v_dim_of(case_id), itemsize=8)
    if path == "ring":
        return azd.ring_bytes(lay, rank, backward=True, **kw)
    if path == "ulysses":
        return azd.ulysses_bytes(lay, rank, q_heads=s["q_heads"], backward=True, **kw)
    if path == "allgather":
        return azd.allgather_bytes(lay, rank, backward=True, **kw)
    if path == "halo":
        return azd.halo_bytes(method, lay, rank, causal=causal, backward=True, **kw, **options)
    feats = 2 if options.get("feature_map") == "cosformer" else 1
    normalize = method == "linear" and options.get("normalize", True)
    return azd.lasp2_bytes(lay, batch=s["batch"], q_heads=s["q_heads"], features=feats * s["head_dim"],
                           v_dim=s["v_dim"], compute_itemsize=8, normalize=normalize, backward=True)


def _cases_worker(rank, world):
    """Every case on this rank: its output and gradient rows and the bytes it sent."""
    results = {}
    for i, (cid, path, method, options, causal, kind) in enumerate(CASES):
        lay = SequenceLayout.build(kind, N, world)
        q, k, v, do = full_inputs(i)
        ql, kl, vl = (lay.shard(t, rank).clone().requires_grad_() for t in (q, k, v))
        with comm.count_bytes() as c:
            out = run_path(path, ql, kl, vl, method=method, causal=causal, layout=kind, options=options)
            out.backward(lay.shard(do, rank))
        results[cid] = dict(out=out.detach(), dq=ql.grad, dk=kl.grad, dv=vl.grad, bytes=c.payload, meta=c.meta)
    return results


#: (strategy, layout) of the layer test
LAYER_RUNS = (("lasp2h", "contiguous"), ("auto", "zigzag"), ("ulysses", "contiguous"))


def _stack(cls, **kw):
    torch.manual_seed(0)
    return torch.nn.ModuleList([
        cls(dim=16, heads=4, kv_heads=2, method="lightning", causal=True, rotary=True, chunk=4, **kw),
        cls(dim=16, heads=4, kv_heads=2, method="softmax", causal=True, rotary=True, qk_norm=True, **kw),
        cls(dim=16, heads=4, method="sliding_window", causal=True, window=5, gate=True, **kw),
    ]).double()


def _layers_worker(rank, world):
    results = {}
    for strategy, kind in LAYER_RUNS:
        sp = azd.SequenceParallel(strategy=strategy, layout=kind)
        model = _stack(azd.SequenceParallelAttention, sequence_parallel=sp)
        lay = SequenceLayout.build(kind, N, world)
        x = torch.randn(2, N, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        xl = lay.shard(x, rank, dim=1).clone().requires_grad_()
        y = xl
        for layer in model:
            y = y + layer(y)
        y.pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[strategy] = dict(y=y.detach(), dx=xl.grad, grads=grads)
    return results

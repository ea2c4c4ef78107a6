"""Attention rollout and attention flow: how much each output token draws from each input
token through all layers ("Quantifying Attention Flow in Transformers", Abnar & Zuidema,
2020).

Both start from the per-layer token graph. Layer ``l``'s heads are averaged and the
residual connection is added as identity, ``Ã_l = r·I + (1 - r)·mean_h A_l`` (the paper
uses ``r = 0.5``), rows renormalised. Then

* **rollout** multiplies them, ``R = Ã_L ··· Ã_1``: ``R[i, j]`` is the share of output
  token ``i`` that comes from input token ``j`` if attention mixed linearly — ``O(L N³)``;
* **flow** treats the layered graph (nodes = (layer, token), an edge ``(l-1, j) → (l, i)``
  of capacity ``Ã_l[i, j]``) as a flow network and takes the maximum flow from input
  token ``j`` (layer 0) to output token ``i`` (layer ``L``): ``F[i, j]``. One max-flow
  (Edmonds–Karp, ``O(V E²)`` with ``V = (L+1) N``, ``E = L N²``) per pair, so flow is for
  short sequences (tens of tokens) or a few output rows (``queries=[0]``, the [CLS] row).
"""

from __future__ import annotations

from collections import deque
from typing import Optional, Sequence

import torch

from ..errors import AttentionInputError, fmt_shape


def _layers(maps) -> list:
    """A stack ``(L, B, H, N, N)`` or a list of ``(B, H, N, N)`` as a list of tensors."""
    layers = list(maps.unbind(0)) if isinstance(maps, torch.Tensor) else list(maps)
    if not layers:
        raise AttentionInputError("maps must hold at least one layer")
    for i, m in enumerate(layers):
        if not isinstance(m, torch.Tensor) or m.dim() != 4 or m.shape[-1] != m.shape[-2]:
            got = fmt_shape(m) if isinstance(m, torch.Tensor) else type(m).__name__
            raise AttentionInputError(f"maps[{i}] must be self-attention weights (B, H, N, N), got {got}")
        if m.shape[0] != layers[0].shape[0] or m.shape[-1] != layers[0].shape[-1]:
            raise AttentionInputError(f"maps[{i}] has shape {fmt_shape(m)}, layer 0 has {fmt_shape(layers[0])}")
    return layers


def residual_graph(maps, residual: float = 0.5, head_reduce: str = "mean") -> list:
    """``[Ã_l]``, each ``(B, N, N)`` float64: ``r·I + (1 - r)·reduce_h A_l``, rows renormalised
    (a row that was all zero stays the identity row). ``head_reduce``: ``"mean"`` (the
    paper's) or ``"max"``."""
    if not 0.0 <= residual <= 1.0:
        raise AttentionInputError(f"residual must be in [0, 1], got {residual}")
    if head_reduce not in ("mean", "max"):
        raise AttentionInputError(f"head_reduce must be 'mean' or 'max', got {head_reduce!r}")
    out = []
    for m in _layers(maps):
        a = m.double().mean(1) if head_reduce == "mean" else m.double().amax(1)
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
        g = residual * eye + (1 - residual) * a
        s = g.sum(-1, keepdim=True)
        out.append(torch.where(s > 0, g / s.clamp_min(1e-300), eye))
    return out


def attention_rollout(maps, residual: float = 0.5, head_reduce: str = "mean") -> torch.Tensor:
    """Attention rollout: ``R = Ã_L ··· Ã_1``, ``(B, N, N)`` float64; row ``i`` is output
    token ``i``'s mix of the input tokens (rows sum to 1).

    maps: the layers' self-attention weights, ``(L, B, H, N, N)`` or a list of ``(B, H, N,
    N)``, first layer first. Identity maps give the identity; uniform maps with
    ``residual=0`` give uniform rows.
    """
    graph = residual_graph(maps, residual, head_reduce)
    r = graph[0]
    for g in graph[1:]:
        r = g @ r
    return r


def _max_flow(cap: list, s: int, t: int, eps: float = 1e-12) -> float:
    """Edmonds–Karp maximum flow on a graph given as ``cap[u] = {v: capacity}`` (modified)."""
    flow = 0.0
    n = len(cap)
    while True:
        parent = [-1] * n
        parent[s] = s
        q = deque([s])
        while q and parent[t] < 0:
            u = q.popleft()
            for v, c in cap[u].items():
                if c > eps and parent[v] < 0:
                    parent[v] = u
                    q.append(v)
        if parent[t] < 0:
            return flow
        v, push = t, float("inf")
        while v != s:
            push = min(push, cap[parent[v]][v])
            v = parent[v]
        v = t
        while v != s:
            u = parent[v]
            cap[u][v] -= push
            cap[v][u] = cap[v].get(u, 0.0) + push
            v = u
        flow += push


def attention_flow(maps, residual: float = 0.5, head_reduce: str = "mean", *,
                   queries: Optional[Sequence[int]] = None, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention flow: ``F[b, i, j]`` = the maximum flow from input token ``j`` to output
    token ``i`` through the layered graph of :func:`residual_graph`; ``(B, Nq', N)`` float64
    for the output rows ``queries`` (default all).

    maps as for :func:`attention_rollout`. ``key_mask (B, N)`` (True = real) leaves padded
    tokens out of the graph. With one layer the flow is the edge itself, ``F = Ã_1``; it
    never exceeds 1 (the capacity into an output node).
    """
    graph = [g.cpu() for g in residual_graph(maps, residual, head_reduce)]
    L, (B, N, _) = len(graph), graph[0].shape
    rows = list(range(N)) if queries is None else [int(i) for i in queries]
    for i in rows:
        if not 0 <= i < N:
            raise AttentionInputError(f"query {i} is outside the {N} tokens")
    out = torch.zeros(B, len(rows), N, dtype=torch.float64)
    for b in range(B):
        real = list(range(N)) if key_mask is None else [t for t in range(N) if bool(key_mask[b, t])]
        base = [dict() for _ in range((L + 1) * N)]
        for l, g in enumerate(graph):
            gb = g[b].tolist()
            for i in real:
                for j in real:
                    if gb[i][j] > 0:
                        base[l * N + j][(l + 1) * N + i] = gb[i][j]
        for r, i in enumerate(rows):
            if i not in real:
                continue
            for j in real:
                cap = [dict(d) for d in base]
                out[b, r, j] = _max_flow(cap, j, L * N + i)
    return out

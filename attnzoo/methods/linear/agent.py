"""Agent attention.

A small set of ``n`` agent tokens ``A`` (pooled from the queries) first gathers the
values with softmax attention, then broadcasts them back to every query::

    A   = pool(Q)                                   (n × D agent tokens)
    V_A = softmax(A Kᵀ · scale [+ B_agg]) V         agent aggregation  (n × Dv)
    O   = softmax(Q Aᵀ · scale [+ B_bcast]) V_A     agent broadcast    (Nq × Dv)
    O  += DWC(V)                                    depthwise conv of V (self-attention)

"Agent Attention: On the Integration of Softmax and Linear Attention" (Han et
al., ECCV 2024). The effective attention matrix is
``W = softmax(Q Aᵀ) softmax(A Kᵀ)`` (Nq × Nk, rank <= n), a generalised linear
attention with softmax feature maps; computing ``V_A`` first costs
O(N · n · D) time and O(N · n) memory.

Pooling: 1-D, ``A`` is the adaptive average pooling of q along the tokens to
``num_agents``; 2-D (``grid=(H, W)``, ``H·W = Nq``, tokens row-major), the adaptive
average pooling of q over the grid to ``agent_grid=(h, w)`` (default
``h = w = √num_agents``, which must then be a perfect square).

Options: ``dwc_weight`` is a depthwise kernel over the value channels of every
k/v head, ``(Hkv·Dv, 1, k)`` in 1-D or ``(Hkv·Dv, 1, kh, kw)`` in 2-D (the
weight of ``nn.Conv1d/2d(C, C, k, groups=C)``), or ``(1, 1, ...)`` for one kernel
shared by all channels; padding "same" (zeros). ``agent_bias`` is a pair
``(B_agg, B_bcast)`` of additive score biases broadcastable to ``(B, Hq, n, Nk)``
and ``(B, Hq, Nq, n)`` (either may be None). :class:`AgentAttention` holds a
learnable DWC kernel.

Judgement calls:

* [J] The DWC term needs V aligned with Q, so it is applied only when
  ``Nq == Nk`` (self-attention); for cross-attention it is skipped (the module also
  skips it when called with ``cross=True``). It is not part of the returned weights.
* [J] Key padding: padded keys leave the aggregation softmax and are zeroed in V
  before the DWC; a batch row with no real key gives zeros.
* [J] GQA: agents are pooled per query head; K and V are repeated to the query
  heads; the DWC runs on the k/v heads' values and is shared by their query heads.
* [J] The paper's DWC has a bias; a constant per channel before the layer's linear
  output projection is the same as a bias of that projection, so there is none here
  (and zero inputs give zero outputs).
* [J] The paper's agent biases are position biases of fixed image resolutions; here
  ``agent_bias`` takes any precomputed biases, and the module learns only the DWC.
* [J] No causal form: every agent pools over all the queries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ...errors import AttentionInputError, fmt_shape
from ...kernels.common import compute_dtype, int_pair, repeat_kv
from ...kernels.dense import masked_softmax
from ...registry import MethodOptions, method

_PATTERNS = ("noncausal_self", "noncausal_cross")


# -------------------------------------------------------------------------- options


@dataclass(frozen=True)
class AgentOptions(MethodOptions):
    """Options of ``agent``.

    Attributes:
        num_agents: n agent tokens (1-D; on a grid, ``h·w`` unless ``agent_grid`` is given).
        grid: ``(H, W)`` for 2-D inputs (tokens the grid cells, row-major), or None.
        agent_grid: ``(h, w)`` of the agents on the grid (default ``√num_agents`` square).
        dwc_weight: depthwise kernel over V, ``(Hkv·Dv, 1, k)`` (1-D) or
            ``(Hkv·Dv, 1, kh, kw)`` (2-D), or ``(1, 1, ...)`` shared; None: no DWC term.
        agent_bias: ``(B_agg, B_bcast)`` additive biases broadcastable to ``(B, Hq, n, Nk)``
            and ``(B, Hq, Nq, n)`` (either may be None), or None.
    """

    num_agents: int = 16
    grid: Optional[tuple] = None
    agent_grid: Optional[tuple] = None
    dwc_weight: Optional[torch.Tensor] = None
    agent_bias: Optional[tuple] = None

    def validate(self) -> None:
        if self.num_agents < 1:
            raise AttentionInputError(f"num_agents must be a positive int, got {self.num_agents!r}")
        _pair("grid", self.grid)
        agent_grid = _pair("agent_grid", self.agent_grid)
        if self.grid is not None and agent_grid is None:
            _square(self.num_agents)
        if self.agent_bias is not None and len(self.agent_bias) != 2:
            raise AttentionInputError(
                f"agent_bias must be a pair (B_agg, B_bcast) of tensors broadcastable to (B, Hq, n, Nk) and "
                f"(B, Hq, Nq, n) (either may be None), got {type(self.agent_bias).__name__}"
            )

    @classmethod
    def for_length(cls, n: int) -> dict:
        """About a quarter of the tokens as agents at short lengths, the default 16 from 64 on;
        always a perfect square (4, 9 or 16), so a 2-D call (``grid=``) takes it as it is."""
        return {"num_agents": min(4, max(2, math.isqrt(n // 4))) ** 2}


# --------------------------------------------------------------------------- checks


def _pair(name, value):
    return None if value is None else int_pair(name, value)


def _square(num_agents) -> int:
    """The side of the square agent grid of ``num_agents`` agents (it must be a square)."""
    side = math.isqrt(num_agents) if isinstance(num_agents, int) and num_agents > 0 else 0
    if side * side != num_agents or isinstance(num_agents, bool):
        raise AttentionInputError(
            f"2-D agent attention needs num_agents to be a perfect square (h = w = √n), got num_agents="
            f"{num_agents!r}; or pass agent_grid=(h, w)"
        )
    return side


def _shapes(q, o: AgentOptions):
    """``(grid, agent_grid)`` for 2-D (pairs) or ``(None, n)`` for 1-D, checked against q."""
    Nq = q.shape[2]
    grid = _pair("grid", o.grid)
    if grid is None:
        return None, o.num_agents
    if grid[0] * grid[1] != Nq:
        raise AttentionInputError(
            f"grid={grid} has {grid[0] * grid[1]} cells but q has Nq={Nq} tokens (q {fmt_shape(q)}); "
            "tokens must be the H·W grid cells in row-major order"
        )
    agent_grid = _pair("agent_grid", o.agent_grid)
    if agent_grid is None:
        side = _square(o.num_agents)
        agent_grid = (side, side)
    return grid, agent_grid


def _dwc_kernel(dwc_weight, v, grid, ct):
    """The DWC kernel as ``(Hkv·Dv, 1, *k)`` in the compute dtype (shared kernels expanded)."""
    C = v.shape[1] * v.shape[3]
    dims = 1 if grid is None else 2
    w = dwc_weight
    layout = "(Hkv·Dv, 1, k)" if dims == 1 else "(Hkv·Dv, 1, kh, kw)"
    if not isinstance(w, torch.Tensor):
        raise AttentionInputError(f"dwc_weight must be a tensor {layout}, got {type(w).__name__}")
    if w.dim() != 2 + dims or w.shape[1] != 1 or w.shape[0] not in (1, C) or 0 in w.shape:
        raise AttentionInputError(
            f"dwc_weight must have shape {layout} with Hkv·Dv = {v.shape[1]}·{v.shape[3]} = {C} "
            f"(or 1 for a kernel shared by all channels) for {'2-D (grid given)' if dims == 2 else '1-D'} "
            f"inputs, got {fmt_shape(w)}"
        )
    return w.to(device=v.device, dtype=ct).expand(C, *w.shape[1:])


def _biases(agent_bias, B, H, Nq, Nk, n, ct):
    if agent_bias is None:
        return None, None
    out = []  # a pair: AgentOptions.validate checked it
    for name, b, shape in (("agent_bias[0]", agent_bias[0], (B, H, n, Nk)), ("agent_bias[1]", agent_bias[1], (B, H, Nq, n))):
        if b is None:
            out.append(None)
            continue
        if not isinstance(b, torch.Tensor) or b.dim() > 4:
            raise AttentionInputError(f"{name} must be a tensor broadcastable to {fmt_shape(shape)}, got {b!r}")
        try:
            ok = torch.broadcast_shapes(b.shape, shape) == torch.Size(shape)
        except RuntimeError:
            ok = False
        if not ok:
            raise AttentionInputError(f"{name} of shape {fmt_shape(b)} does not broadcast to {fmt_shape(shape)}")
        out.append(b.to(ct))
    return tuple(out)


# ------------------------------------------------------------------------ reference


def pool_matrix(n_in: int, n_out: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Adaptive average pooling as an explicit ``(n_out, n_in)`` matrix: output ``i``
    averages inputs ``floor(i·n_in/n_out) <= t < ceil((i+1)·n_in/n_out)``."""
    P = torch.zeros(n_out, n_in, dtype=dtype, device=device)
    for i in range(n_out):
        s, e = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        P[i, s:e] = 1.0 / (e - s)
    return P


def _dwc_explicit(v, kernel, grid):
    """Depthwise convolution of the values, 'same' zero padding, as explicit shifted sums:
    ``out[t] = Σ_u w[u] · v[t + u - (k-1)//2]`` (per channel; 2-D: over both grid axes)."""
    B, Hkv, N, Dv = v.shape
    if grid is None:
        k = kernel.shape[-1]
        w = kernel.view(Hkv, Dv, k)
        left = (k - 1) // 2
        vp = F.pad(v, (0, 0, left, k - 1 - left))
        return sum(w[:, :, u].view(1, Hkv, 1, Dv) * vp[:, :, u:u + N] for u in range(k))
    H, W = grid
    kh, kw = kernel.shape[-2:]
    w = kernel.view(Hkv, Dv, kh, kw)
    top, left = (kh - 1) // 2, (kw - 1) // 2
    vp = F.pad(v.view(B, Hkv, H, W, Dv), (0, 0, left, kw - 1 - left, top, kh - 1 - top))
    out = sum(w[:, :, a, b].view(1, Hkv, 1, 1, Dv) * vp[:, :, a:a + H, b:b + W] for a in range(kh) for b in range(kw))
    return out.reshape(B, Hkv, N, Dv)


@method("agent", options=AgentOptions,
        summary="agent tokens pooled from Q: softmax(QAᵀ)·(softmax(AKᵀ)V) plus a depthwise conv of V",
        paper="Agent Attention: On the Integration of Softmax and Linear Attention",
        patterns=_PATTERNS, time="O(N n D)", memory="O(N n)", masks=False, grid=True, rows_independent=False)
def agent(q, k, v, call):
    """Agent attention with the explicit ``Nq × Nk`` matrix ``W = softmax(QAᵀ) softmax(AKᵀ)``
    and the pooling as an explicit matrix.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    The weights returned are ``W`` (the DWC term is not an attention weight).
    """
    o = call.options
    key_mask, scale, dwc_weight = call.key_mask, call.scale, o.dwc_weight
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    ct = compute_dtype(q.dtype)
    grid, agents = _shapes(q, o)
    if grid is None:
        P = pool_matrix(Nq, agents, ct, q.device)
    else:  # separable: rows of the grid, then columns (agents and tokens row-major)
        P = torch.kron(pool_matrix(grid[0], agents[0], ct, q.device), pool_matrix(grid[1], agents[1], ct, q.device))
    n = P.shape[0]
    b_agg, b_bcast = _biases(o.agent_bias, B, Hq, Nq, Nk, n, ct)
    qc = q.to(ct)
    kc, vc = repeat_kv(k, Hq).to(ct), repeat_kv(v, Hq).to(ct)
    A = P @ qc  # agent tokens (B, Hq, n, D)
    s_agg = (A @ kc.transpose(-1, -2)) * scale + (0 if b_agg is None else b_agg)
    real = None if key_mask is None else key_mask.view(B, 1, 1, Nk)
    p_agg = masked_softmax(s_agg, real)  # (B, Hq, n, Nk)
    s_bcast = (qc @ A.transpose(-1, -2)) * scale + (0 if b_bcast is None else b_bcast)
    p_bcast = torch.softmax(s_bcast, dim=-1)  # (B, Hq, Nq, n)
    weights = p_bcast @ p_agg  # W: (B, Hq, Nq, Nk)
    out = weights @ vc
    if dwc_weight is not None and Nq == Nk:
        vv = v.to(ct)
        if real is not None:
            vv = vv * real.view(B, 1, Nk, 1).to(ct)
        out = out + repeat_kv(_dwc_explicit(vv, _dwc_kernel(dwc_weight, v, grid, ct), grid), Hq)
    out = out.to(q.dtype)
    return (out, weights.to(q.dtype)) if call.return_weights else out


# ----------------------------------------------------------------------------- fast


@agent.impl("agent", description="agent values V_A first, adaptive pooling and conv1d/conv2d: O(N·n·D), O(N·n) memory")
def agent_attention(q, k, v, call):
    """``V_A`` first: pooling by ``adaptive_avg_pool1d/2d``, two ``n``-wide softmaxes and
    the DWC by ``conv1d/2d``; O(N·n·D) time, O(N·n) memory, no N×N tensor. (With at most
    ``n`` keys, ``W`` is no larger than the ``Nq × n`` broadcast weights and it takes the
    association with fewer flops.)"""
    o = call.options
    key_mask, scale, dwc_weight = call.key_mask, call.scale, o.dwc_weight
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    ct = compute_dtype(q.dtype)
    grid, agents = _shapes(q, o)
    qc = q.to(ct)
    if grid is None:
        A = F.adaptive_avg_pool1d(qc.reshape(B * Hq, Nq, D).transpose(1, 2), agents)  # (B·Hq, D, n)
    else:
        x = qc.reshape(B * Hq, grid[0], grid[1], D).permute(0, 3, 1, 2)
        A = F.adaptive_avg_pool2d(x, agents).flatten(2)
    A = A.transpose(1, 2).reshape(B, Hq, -1, D)
    n = A.shape[2]
    b_agg, b_bcast = _biases(o.agent_bias, B, Hq, Nq, Nk, n, ct)
    kc, vc = repeat_kv(k, Hq).to(ct), repeat_kv(v, Hq).to(ct)
    s_agg = (A @ kc.transpose(-1, -2)) * scale
    if b_agg is not None:
        s_agg = s_agg + b_agg
    real = None if key_mask is None else key_mask.view(B, 1, 1, Nk)
    p_agg = masked_softmax(s_agg, real)  # (B, Hq, n, Nk)
    s_bcast = (qc @ A.transpose(-1, -2)) * scale
    if b_bcast is not None:
        s_bcast = s_bcast + b_bcast
    p_bcast = torch.softmax(s_bcast, dim=-1)  # (B, Hq, Nq, n)
    if Nk <= n and Nq * Nk * (n + Dv) < n * Dv * (Nq + Nk):
        out = (p_bcast @ p_agg) @ vc  # few keys (Nk <= n): W (Nq × Nk <= Nq × n) is the cheaper association
    else:
        out = p_bcast @ (p_agg @ vc)  # V_A first
    if dwc_weight is not None and Nq == Nk:
        kernel = _dwc_kernel(dwc_weight, v, grid, ct)
        vv = v.to(ct)
        if real is not None:
            vv = vv * real.view(B, 1, Nk, 1).to(ct)
        C = Hkv * Dv
        x = vv.permute(0, 1, 3, 2).reshape(B, C, Nk)  # channels = (k/v head, value dim)
        if grid is None:
            y = F.conv1d(x, kernel, padding="same", groups=C)
        else:
            y = F.conv2d(x.view(B, C, *grid), kernel, padding="same", groups=C)
        y = y.reshape(B, Hkv, Dv, Nk).permute(0, 1, 3, 2)
        out = out + repeat_kv(y, Hq)
    return out.to(q.dtype)


# --------------------------------------------------------------------------- module


@agent.module_class
class AgentAttention(torch.nn.Module):
    """Agent attention with a learnable depthwise convolution on V (the paper's DWC);
    call it like the functional form: ``module(q, k, v, key_mask=..., cross=...)``.

    Args:
        heads, kv_heads: query and key/value heads (``kv_heads`` defaults to ``heads``).
        head_dim: D. ``v_dim``: Dv (default D).
        num_agents: agent tokens (1-D); ``grid=(H, W)``: 2-D inputs, ``agent_grid=(h, w)``
            (default ``√num_agents`` square).
        kernel_size: of the DWC (``k`` in 1-D, ``k × k`` on the grid).

    The DWC is skipped for cross-attention (``cross=True`` or ``Nq != Nk``).
    """

    def __init__(self, heads: int, head_dim: int, kv_heads: Optional[int] = None, v_dim: Optional[int] = None,
                 impl: str = "auto", num_agents: int = 16, grid=None, kernel_size: int = 3, agent_grid=None):
        super().__init__()
        kv_heads = kv_heads or heads
        C = kv_heads * (v_dim or head_dim)
        self.heads, self.kv_heads, self.impl = heads, kv_heads, impl
        self.num_agents, self.grid, self.agent_grid = num_agents, _pair("grid", grid), _pair("agent_grid", agent_grid)
        shape = (C, 1, kernel_size) if grid is None else (C, 1, kernel_size, kernel_size)
        self.dwc_weight = torch.nn.Parameter(torch.empty(shape))
        torch.nn.init.kaiming_uniform_(self.dwc_weight, a=math.sqrt(5))  # nn.Conv's default initialisation

    def forward(self, q, k, v, **kwargs):
        cross = kwargs.get("cross")
        cross = q.shape[2] != k.shape[2] if cross is None else cross
        kwargs.setdefault("impl", self.impl)
        kwargs.setdefault("num_agents", self.num_agents)
        kwargs.setdefault("grid", self.grid)
        kwargs.setdefault("agent_grid", self.agent_grid)
        return agent(q, k, v, dwc_weight=None if cross else self.dwc_weight, **kwargs)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, kv_heads={self.kv_heads}, num_agents={self.num_agents}, grid={self.grid}"


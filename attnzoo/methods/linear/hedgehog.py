"""Hedgehog: linear attention with trainable feature maps that mimic softmax.

    φ_h(x) = [exp(W_h x + b_h), exp(-(W_h x + b_h))]      (2F features)
    o_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ / φ(q_i)ᵀ Σ_j φ(k_j)

"The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry"
(Zhang et al., ICLR 2024). Linear attentions lose softmax's two key properties —
low-entropy ("spiky") weights and dot-product monotonicity; Hedgehog recovers them
with a per-head single-layer MLP feature map trained so the linear-attention weights
match softmax's (a cross-entropy between the two weight matrices):
:func:`distill_hedgehog`. The map is the paper's ``exp`` one (``activation="exp"``, the
default), computed stably as FAVOR+ is: the log-features ``[z, -z]`` are shifted by a
per-row max for queries and one max per (batch, head) for keys before the ``exp``
(:func:`attnzoo.kernels.linear_scan.feature_pair`) — constants that cancel exactly in
the normalisation, so the weights are the paper's. ``activation="softmax"`` is the
variant of the released code, ``[softmax(z), softmax(-z)]``: NOT the same map — each
half is divided by its own sum over the features, two different factors per row, so
the normalised weights differ from the paper's (by up to 0.033 on random inputs).

The functional form takes the map's parameters as options (``weight (H, D, F)``,
``bias (H, F)``; None = identity map); :class:`HedgehogAttention`
(``attnzoo.build("hedgehog", heads=..., head_dim=...)``) holds them. The attention
itself is the normalised kernel attention of :mod:`attnzoo.kernels.linear_scan`, as
``linear``'s (chunked causal scan, ``φ(K)ᵀV`` first), so time O(N F Dv), memory
O(N·C + F·Dv), and decoding keeps a constant-size state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ...errors import AttentionInputError, fmt_shape
from ...kernels.caches import Decoder, RecurrentState
from ...kernels.dense import softmax_attention
from ...kernels.linear_scan import (DEFAULT_CHUNK, check_chunk, dense_kernel_attention, kernel_attention,
                                    kernel_attention_step, positionless)
from ...registry import MethodOptions, method

ACTIVATIONS = ("softmax", "exp")


@dataclass(frozen=True)
class HedgehogOptions(MethodOptions):
    """Options of ``hedgehog``.

    Attributes:
        weight: ``(Hq, D, F)`` per-head projection of the feature map (None: identity).
        bias: ``(Hq, F)`` (None: none).
        activation: ``"exp"`` (default: the paper's map) or ``"softmax"`` (the released
            code's variant, each half normalised over its features).
        eps: added to the denominator; None (default) for 1e-6 with ``"softmax"`` and none
            with ``"exp"`` (positive features: the denominator is only guarded against zero,
            so the stabilising shifts cancel exactly).
        chunk: tokens per chunk of the causal scan (``chunk`` and decoding).
    """

    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    activation: str = "exp"
    eps: Optional[float] = None
    chunk: int = DEFAULT_CHUNK

    def validate(self) -> None:
        _check_activation(self.activation)
        check_chunk(self.chunk)


def _check_activation(activation) -> None:
    if activation not in ACTIVATIONS:
        raise AttentionInputError(f"activation must be 'softmax' or 'exp', got {activation!r}")


def feature_map(weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], activation: str = "exp"):
    """Hedgehog's φ as a callable on ``(B, H, N, D)`` (``weight (H, D, F)``, ``bias (H, F)``).

    ``"exp"`` returns the log-features ``[z, -z]`` (the callable has ``log_space = True``:
    the kernel pipeline exponentiates them after its stabilising shifts); ``"softmax"``
    returns the features themselves."""
    _check_activation(activation)

    def phi(x):
        z = x if weight is None else torch.einsum("bhnd,hdf->bhnf", x, weight.to(x.dtype))
        if bias is not None:
            z = z + bias.to(x.dtype).unsqueeze(-2)
        if activation == "softmax":
            return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)
        return torch.cat([z, -z], dim=-1)

    phi.log_space = activation == "exp"
    return phi


def _eps(o) -> float:
    if o.eps is not None:
        return float(o.eps)
    return 0.0 if o.activation == "exp" else 1e-6


def _check_params(q, weight, bias):
    H, D = q.shape[1], q.shape[3]
    if weight is not None and (weight.dim() != 3 or tuple(weight.shape[:2]) != (H, D)):
        raise AttentionInputError(f"weight must have shape (Hq, D, F) = ({H}, {D}, F), got {fmt_shape(weight)}")
    if bias is not None:
        F = D if weight is None else weight.shape[2]
        if tuple(bias.shape) != (H, F):
            raise AttentionInputError(f"bias must have shape (Hq, F) = ({H}, {F}), got {fmt_shape(bias)}")


def _phi(q, o: HedgehogOptions):
    _check_params(q, o.weight, o.bias)
    return positionless(feature_map(o.weight, o.bias, o.activation))


@method("hedgehog", options=HedgehogOptions,
        summary="linear attention with trainable softmax-mimicking feature maps [exp(Wx), exp(-Wx)]",
        paper="The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry",
        time="O(N D^2)", memory="O(N D)", masks=False)
def hedgehog(q, k, v, call):
    """Explicit N×N weights ``φ(Q)φ(K)ᵀ`` normalised per row.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    o = call.options
    return dense_kernel_attention(q, k, v, _phi(q, o), causal=call.causal, key_mask=call.key_mask,
                                  output="normalize", eps=_eps(o), return_weights=call.return_weights)


@hedgehog.impl("chunk", options=("chunk",), description="linear's φ(K)ᵀV-first / chunked causal scan")
def chunk_attention(q, k, v, call):
    """The chunked form of normalised kernel attention with the Hedgehog feature map."""
    o = call.options
    return kernel_attention(q, k, v, _phi(q, o), causal=call.causal, key_mask=call.key_mask, output="normalize",
                            eps=_eps(o), chunk=o.chunk)


@hedgehog.decodes
class HedgehogDecoder(Decoder):
    """Decoding state: ``S = Σ φ(k_j) [v_j, 1]ᵀ`` per query head (a
    :class:`~attnzoo.kernels.caches.RecurrentState`), as ``linear``'s."""

    state_size = "2F·(Dv+1) per query head, constant in N"
    options = ("chunk",)

    def init_state(self, batch_size, kv_heads, head_dim, v_dim, *, dtype, device, max_len, options):
        return RecurrentState(S=None)

    def step(self, run, state, q, k, v, *, scale, impl, options):
        return kernel_attention_step(state, q, k, v, _phi(q, options), output="normalize", eps=_eps(options),
                                     chunk=options.chunk)


@hedgehog.module_class
class HedgehogAttention(torch.nn.Module):
    """Hedgehog attention with its trainable per-head feature maps.

    Args:
        heads: query heads (k is repeated to them for GQA, and mapped per query head).
        head_dim: D. ``feature_dim``: F (default D; the map gives 2F features).
        activation: ``"exp"`` (default: the paper's map) or ``"softmax"`` (the released code's).
    """

    def __init__(self, heads: int, head_dim: int, kv_heads: Optional[int] = None, v_dim: Optional[int] = None,
                 impl: str = "auto", feature_dim: Optional[int] = None, activation: str = "exp"):
        super().__init__()
        F = feature_dim or head_dim
        w = torch.eye(head_dim, F).repeat(heads, 1, 1) if F == head_dim else torch.randn(heads, head_dim, F) / math.sqrt(head_dim)
        self.weight = torch.nn.Parameter(w)
        self.bias = torch.nn.Parameter(torch.zeros(heads, F))
        self.activation, self.impl = activation, impl

    def forward(self, q, k, v, **kwargs):
        kwargs.setdefault("impl", self.impl)
        return hedgehog(q, k, v, weight=self.weight, bias=self.bias, activation=self.activation, **kwargs)

    def init_state(self, batch_size, kv_heads, head_dim, v_dim, *, dtype=torch.float32, device=None, max_len=None):
        return hedgehog.init_state(batch_size, kv_heads, head_dim, v_dim, dtype=dtype, device=device, max_len=max_len)

    def step(self, state, q, k, v, *, scale=None, impl="auto"):
        return hedgehog.step(state, q, k, v, scale=scale, impl=impl, weight=self.weight, bias=self.bias,
                             activation=self.activation)


def softmax_weights(q, k, causal=False, scale=None):
    """Reference softmax attention weights ``(B, Hq, Nq, Nk)`` (the distillation target)."""
    v = torch.zeros(k.shape[0], k.shape[1], k.shape[2], 1, dtype=q.dtype, device=q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return softmax_attention(q, k, v, scale=scale, causal=causal, return_weights=True)[1]


def attention_kl(target: torch.Tensor, weights: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean over rows of ``KL(target || weights)`` for row-stochastic ``(..., Nq, Nk)`` matrices."""
    t = target.clamp_min(0)
    kl = (t * (torch.log(t + eps) - torch.log(weights.clamp_min(0) + eps))).sum(-1)
    return kl.mean()


def distill_hedgehog(q: torch.Tensor, k: torch.Tensor, module: Optional[HedgehogAttention] = None, *,
                     causal: bool = False, steps: int = 300, lr: float = 0.05, feature_dim: Optional[int] = None,
                     activation: str = "exp", progress: bool = False) -> dict:
    """Train Hedgehog feature maps so linear attention of ``q, k`` mimics their softmax weights.

    Minimises the cross-entropy ``-Σ_ij P_ij log Â_ij`` between softmax weights ``P`` and
    Hedgehog's ``Â`` (the paper's distillation loss) with Adam. ``q (B, Hq, N, D)``,
    ``k (B, Hkv, N, D)``. Returns ``{"module", "kl_before", "kl_after", "losses"}`` where the
    KLs are the mean row ``KL(P || Â)`` — the fidelity reached.
    """
    if module is None:
        module = HedgehogAttention(q.shape[1], q.shape[-1], k.shape[1], feature_dim=feature_dim,
                                   activation=activation).to(q.device)
    q, k = q.detach().float(), k.detach().float()
    target = softmax_weights(q, k, causal)
    v = torch.zeros(k.shape[0], k.shape[1], k.shape[2], 1, device=q.device)

    def current():
        return hedgehog(q, k, v, causal=causal, impl="reference", weight=module.weight, bias=module.bias,
                        activation=module.activation, return_weights=True)[1]

    with torch.no_grad():
        kl_before = float(attention_kl(target, current()))
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    losses = []
    for i in range(steps):
        opt.zero_grad()
        loss = -(target * torch.log(current().clamp_min(1e-12))).sum(-1).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if progress and (i % max(1, steps // 10) == 0 or i == steps - 1):
            print(f"distill_hedgehog: step {i + 1}/{steps} cross-entropy {losses[-1]:.4f}")
    with torch.no_grad():
        kl_after = float(attention_kl(target, current()))
    return {"module": module, "kl_before": kl_before, "kl_after": kl_after, "losses": losses}

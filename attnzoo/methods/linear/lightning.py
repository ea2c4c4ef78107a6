"""Lightning Attention: causal linear attention with per-head decay, in blocks.

    o_i = Norm( Σ_{j <= i} λ_h^(i-j) (φ(q_i)·φ(k_j)) v_j )

"Various Lengths, Constant Speed: Efficient Language Modeling with Lightning
Attention" and "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence
Lengths in Large Language Models" (Qin et al., 2024), the attention of
"Scaling TransNormer to 175 Billion Parameters" (TransNormerLLM). The sequence is cut
into blocks of ``chunk`` tokens: inside a block ``[(Q_i K_iᵀ) ⊙ M_λ] V_i`` with
``M_λ[s, t] = λ^(s-t)`` (s >= t), across blocks the running state
``KV <- λ^C KV + (λ^(C-1-t) K_i)ᵀ V_i`` read by ``λ^(s+1) Q_i KV`` — no cumulative sum
over tokens. There is no softmax and no denominator: TransNormer's NormAttention puts
an RMS norm on each head's output instead (``output_norm=True``).

Decay: ``decay`` = a float or one λ per head; by default (``decay_schedule="slopes"``)
the papers' rule: ``λ_h = exp(-s_h · (1 - layer_ratio + 1e-5))`` with ``s_h`` ALiBi's
per-head slopes ``2^(-8/H), 2^(-16/H), ...`` (TransNormerLLM's and Lightning
Attention's released code: ``_build_slope_tensor`` and ``slope_rate · (1 - l / (L - 1)
+ 1e-5)``), e.g. 0.61 … 0.996 for H = 8 at ``layer_ratio`` 0 — every head decays,
gently. ``decay_schedule="linear"`` keeps attnzoo 0.1's rule
``λ_h = exp(-(8 h / H) · (1 - layer_ratio))`` (1 … 9e-4 for H = 8: head 0 without decay,
the last almost forgetting). ``feature_map`` (default ``"identity"``; TransNormerLLM
applies SiLU to q and k in its layer) as in ``linear``.

Causal only (self and lower-right causal cross). Time O(N·C·D + N·D²), memory
O(N·C + D²) per head; decoding keeps the D×Dv state, constant in N.

Implementations: ``reference`` (the explicit N×N decayed weights) and ``chunk`` (the
intra-/inter-block scan of :mod:`attnzoo.kernels.linear_scan`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

import torch
import torch.nn.functional as F

from ...errors import AttentionInputError
from ...kernels.caches import Decoder, RecurrentState
from ...kernels.common import compute_dtype
from ...kernels.score_mods import alibi_slopes
from ...kernels.linear_scan import (DEFAULT_CHUNK, check_chunk, dense_kernel_attention, kernel_attention,
                                    kernel_attention_step, positionless)
from ...registry import MethodOptions, method

_MAPS = {"identity": lambda x: x, "silu": F.silu, "elu": lambda x: F.elu(x) + 1, "relu": F.relu}


@dataclass(frozen=True)
class LightningOptions(MethodOptions):
    """Options of ``lightning``.

    Attributes:
        decay: λ, one value or one per query head, in (0, 1] (default: the per-head
            rule of ``decay_schedule`` with ``layer_ratio``).
        decay_schedule: ``"slopes"`` (the papers': λ_h = exp(-ALiBi slope_h · (1 - layer_ratio
            + 1e-5))) or ``"linear"`` (attnzoo 0.1's λ_h = exp(-(8h/H)(1 - layer_ratio))).
        layer_ratio: l / (L - 1) of the layer, for the default decays.
        feature_map: φ of q and k: ``"identity"`` (default), ``"silu"``, ``"elu"`` (elu + 1), ``"relu"``.
        output_norm: RMS-norm each head's output (NormAttention).
        eps: inside the RMS norm.
        chunk: tokens per block (``chunk`` and decoding).
    """

    decay: Union[float, tuple, list, torch.Tensor, None] = None
    decay_schedule: Literal["slopes", "linear"] = "slopes"
    layer_ratio: float = 0.0
    feature_map: str = "identity"
    output_norm: bool = True
    eps: float = 1e-6
    chunk: int = DEFAULT_CHUNK

    def validate(self) -> None:
        if self.feature_map not in _MAPS:
            raise AttentionInputError(f"feature_map must be one of {', '.join(_MAPS)}, got {self.feature_map!r}")
        if self.decay is not None:  # the range here; the count (one or one per head) at the call
            try:
                d = torch.as_tensor(self.decay, dtype=torch.float64).flatten()
            except (TypeError, ValueError, RuntimeError):
                d = torch.zeros(1)  # not numbers: the message below
            if d.numel() == 0 or bool(((d <= 0) | (d > 1)).any()):
                raise AttentionInputError(f"decay must be one value or one per head, in (0, 1], got {self.decay!r}")
        if not 0.0 <= self.layer_ratio <= 1.0:  # above 1 the default decays would exceed 1 and grow
            raise AttentionInputError(f"layer_ratio must be l / L of the layer, in [0, 1], got {self.layer_ratio!r}")
        check_chunk(self.chunk)


def decays(heads: int, decay=None, layer_ratio: float = 0.0, device=None, dtype=torch.float32,
           schedule: str = "slopes") -> torch.Tensor:
    """Per-head λ ``(H,)`` in (0, 1]: ``decay`` when given, else ``schedule``'s rule."""
    if decay is not None:
        d = torch.as_tensor(decay, dtype=dtype, device=device).flatten()
        d = d.expand(heads) if d.numel() == 1 else d
        if d.numel() != heads or bool(((d <= 0) | (d > 1)).any()):
            raise AttentionInputError(f"decay must be one value or {heads} values in (0, 1], got {decay!r}")
        return d
    if schedule == "slopes":
        slopes = alibi_slopes(heads, device, torch.float64)
        return torch.exp(-slopes * (1.0 - float(layer_ratio) + 1e-5)).to(dtype)
    h = torch.arange(heads, dtype=dtype, device=device)
    return torch.exp(-(8.0 * h / heads) * (1.0 - float(layer_ratio)))


def _prepare(q, o: LightningOptions):
    """φ (position-free), the per-head decays in the compute dtype and the output."""
    lam = decays(q.shape[1], o.decay, o.layer_ratio, q.device, compute_dtype(q.dtype), o.decay_schedule)
    return positionless(_MAPS[o.feature_map]), lam, "rms" if o.output_norm else None


@method("lightning", options=LightningOptions,
        summary="causal linear attention with per-head decay in intra/inter blocks, NormAttention output (TransNormerLLM)",
        paper="Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language Models",
        patterns=("causal_self", "causal_cross"), time="O(N D^2)", memory="O(N D)", masks=False)
def lightning(q, k, v, call):
    """Explicit N×N decayed weights ``(φQ φKᵀ) ⊙ M_λ`` (lower-right aligned), then the norm.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    phi, lam, output = _prepare(q, call.options)
    return dense_kernel_attention(q, k, v, phi, causal=True, key_mask=call.key_mask, output=output,
                                  eps=call.options.eps, decay=lam, return_weights=call.return_weights)


@lightning.impl("chunk", options=("chunk",),
                description="intra-block masked products + inter-block decayed state")
def chunk_attention(q, k, v, call):
    """Lightning's intra-block / inter-block computation (``chunk`` tokens per block)."""
    o = call.options
    phi, lam, output = _prepare(q, o)
    return kernel_attention(q, k, v, phi, causal=True, key_mask=call.key_mask, output=output, eps=o.eps,
                            chunk=o.chunk, decay=lam)


@lightning.decodes
class LightningDecoder(Decoder):
    """Decoding state: the decayed ``Σ λ^(t-j) φ(k_j) v_jᵀ`` per query head (a
    :class:`~attnzoo.kernels.caches.RecurrentState`)."""

    state_size = "D·Dv per query head, constant in N"
    options = ("chunk",)

    def init_state(self, batch_size, kv_heads, head_dim, v_dim, *, dtype, device, max_len, options):
        return RecurrentState(S=None)

    def step(self, run, state, q, k, v, *, scale, impl, options):
        phi, lam, output = _prepare(q, options)
        return kernel_attention_step(state, q, k, v, phi, output=output, eps=options.eps, chunk=options.chunk,
                                     decay=lam)

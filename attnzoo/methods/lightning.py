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

Decay: ``decay`` = a float or one λ per head; the default is TransNormerLLM's rule
``λ_h = exp(-(8 h / H) · (1 - layer_ratio))`` for heads h = 0..H-1 [J: with
``layer_ratio`` = l / L of the layer, 0 by default, head 0 has no decay]. ``feature_map``
(default ``"identity"``; TransNormerLLM applies SiLU to q and k in its layer) as in
``linear``.

Causal only (self and lower-right causal cross). Time O(N·C·D + N·D²), memory
O(N·C + D²) per head; decoding keeps the D×Dv state, constant in N.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

from ..errors import AttentionInputError
from ..registry import Impl, MethodSpec, register
from . import _linear
from ._common import compute_dtype, repeat_kv

_MAPS = {"identity": lambda x: x, "silu": F.silu, "elu": lambda x: F.elu(x) + 1, "relu": F.relu}


def decays(heads: int, decay=None, layer_ratio: float = 0.0, device=None, dtype=torch.float32) -> torch.Tensor:
    """Per-head λ ``(H,)`` in (0, 1]."""
    if decay is not None:
        d = torch.as_tensor(decay, dtype=dtype, device=device).flatten()
        d = d.expand(heads) if d.numel() == 1 else d
        if d.numel() != heads or bool(((d <= 0) | (d > 1)).any()):
            raise AttentionInputError(f"decay must be one value or {heads} values in (0, 1], got {decay!r}")
        return d
    h = torch.arange(heads, dtype=dtype, device=device)
    return torch.exp(-(8.0 * h / heads) * (1.0 - float(layer_ratio)))


def _prepare(q, k, v, key_padding_mask, feature_map, decay, layer_ratio):
    if feature_map not in _MAPS:
        raise AttentionInputError(f"feature_map must be one of {', '.join(_MAPS)}, got {feature_map!r}")
    ct = compute_dtype(q.dtype)
    phi = _MAPS[feature_map]
    Hq = q.shape[1]
    fq = phi(q.to(ct))
    fk = phi(repeat_kv(k, Hq).to(ct))
    vv = repeat_kv(v, Hq).to(ct)
    if key_padding_mask is not None:
        keep = key_padding_mask.view(k.shape[0], 1, -1, 1).to(ct)
        fk, vv = fk * keep, vv * keep
    return fq, fk, vv, decays(Hq, decay, layer_ratio, q.device, ct)


def _norm(out, output_norm, eps):
    return out * torch.rsqrt(out.pow(2).mean(dim=-1, keepdim=True) + eps) if output_norm else out


def reference(q, k, v, *, causal=True, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
              return_weights=False, decay: Union[float, torch.Tensor, None] = None, layer_ratio: float = 0.0,
              feature_map: str = "identity", output_norm: bool = True, eps: float = 1e-6):
    """Explicit N×N decayed weights ``(φQ φKᵀ) ⊙ M_λ`` (lower-right aligned), then the norm.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    fq, fk, vv, lam = _prepare(q, k, v, key_padding_mask, feature_map, decay, layer_ratio)
    Nq, Nk = q.shape[2], k.shape[2]
    i = torch.arange(Nq, device=q.device).view(-1, 1) + (Nk - Nq)
    j = torch.arange(Nk, device=q.device).view(1, -1)
    dist = (i - j).clamp(min=0).to(fq.dtype)
    m = torch.exp(torch.log(lam).view(1, -1, 1, 1) * dist) * (j <= i)
    w = (fq @ fk.transpose(-1, -2)) * m
    out = _norm(w @ vv, output_norm, eps).to(q.dtype)
    return (out, w.to(q.dtype)) if return_weights else out


def chunk_attention(q, k, v, *, causal=True, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
                    return_weights=False, decay=None, layer_ratio=0.0, feature_map="identity", output_norm=True,
                    eps=1e-6, chunk: int = _linear.DEFAULT_CHUNK):
    """Lightning's intra-block / inter-block computation (``chunk`` tokens per block)."""
    if q.shape[2] == k.shape[2]:  # self-attention: segment by segment, state carried

        def run_segment(q_s, k_s, v_s, kpm_s, offset, state):
            fq, fk, vv, lam = _prepare(q_s, k_s, v_s, kpm_s, feature_map, decay, layer_ratio)
            out, state = _linear.causal_linear(fq, fk, vv, decay=lam, chunk=chunk, initial_state=state,
                                               return_state=True)
            return _norm(out, output_norm, eps).to(q.dtype), state

        return _linear.causal_segments(q, k, v, key_padding_mask, run_segment, chunk)
    fq, fk, vv, lam = _prepare(q, k, v, key_padding_mask, feature_map, decay, layer_ratio)
    out = _linear.causal_aligned(fq, fk, vv, decay=lam, chunk=chunk)
    return _norm(out, output_norm, eps).to(q.dtype)


class LightningState:
    """Decoding state: the decayed ``Σ λ^(t-j) φ(k_j) v_jᵀ`` per query head."""

    def __init__(self):
        self.S = None

    def nbytes(self) -> int:
        return 0 if self.S is None else self.S.numel() * self.S.element_size()


def init_state(batch_size, kv_heads, head_dim, v_dim, *, dtype=torch.float32, device=None, max_len=None, decay=None,
               layer_ratio=0.0, feature_map="identity", output_norm=True, eps=1e-6, chunk=_linear.DEFAULT_CHUNK):
    return LightningState()


def step(state: LightningState, q, k, v, *, scale, impl="auto", decay=None, layer_ratio=0.0, feature_map="identity",
         output_norm=True, eps=1e-6, chunk=_linear.DEFAULT_CHUNK):
    fq, fk, vv, lam = _prepare(q, k, v, None, feature_map, decay, layer_ratio)
    out, state.S = _linear.causal_linear(fq, fk, vv, decay=lam, chunk=chunk, initial_state=state.S, return_state=True)
    return _norm(out, output_norm, eps).to(q.dtype)


register(
    MethodSpec(
        name="lightning",
        family="linear",
        summary="causal linear attention with per-head decay in intra/inter blocks, NormAttention output (TransNormerLLM)",
        paper="Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language Models",
        reference=reference,
        impls=[Impl("chunk", chunk_attention, description="intra-block masked products + inter-block decayed state")],
        patterns=("causal_self", "causal_cross"),
        exact=False,
        time="O(N D^2)",
        memory="O(N D)",
        masks=False,
        decoding=True,
        state_size="D·Dv per query head, constant in N",
        init_state=init_state,
        step=step,
    )
)

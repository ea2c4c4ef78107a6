"""Kernelized linear attention.

    o_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ  /  φ(q_i)ᵀ Σ_j φ(k_j)          (sums over visible keys j)

"Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention"
(Katharopoulos et al., ICML 2020). Computing ``φ(K)ᵀV`` first makes attention
linear in N; the causal form is an RNN whose state is ``S = Σ φ(k_j) v_jᵀ`` (F × Dv)
plus the normaliser ``z = Σ φ(k_j)``, computed here in chunks (see ``_linear.py``).

Feature maps (``feature_map=``):

* ``"elu"`` — ``elu(x) + 1`` (Katharopoulos et al.), the default;
* ``"relu"``, ``"identity"``;
* ``"cosformer"`` — "cosFormer: Rethinking Softmax in Attention": ``relu(x)``
  re-weighted by ``cos`` / ``sin`` of ``π·pos / (2M)`` (``M = cosformer_len``, default
  the longer of Nq, Nk; decoding needs it given), so that
  ``φ(q_i)·φ(k_j) = relu(q_i)·relu(k_j) cos(π (i - j) / 2M)`` — a locality bias;
* ``"favor"`` — Performer's FAVOR+ ("Rethinking Attention with Performers"): positive
  orthogonal random features ``exp(w·x' - |x'|²/2) / √m`` with ``x' = x · scale^½``,
  an unbiased estimator of the softmax kernel ``exp(scale · q·k)``; ``favor_features``
  (m, default D) and ``favor_seed`` choose the projection — change the seed to redraw;
* any callable ``φ(x: (B, H, N, D)) -> (B, H, N, F)``.

``normalize=False`` is TransNormer's NormAttention ("The Devil in Linear Transformer"):
no denominator, an RMS norm on each head's output instead.

Time O(N F Dv) (+ O(N C F) causal), memory O(N·C + F·Dv) per head; decoding keeps the
constant-size state ``(S, z)``. Accepts key padding, not arbitrary masks.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from ..errors import AttentionInputError
from ..registry import Impl, MethodSpec, register
from . import _linear
from ._common import compute_dtype, repeat_kv

FEATURE_MAPS = ("elu", "relu", "identity", "cosformer", "favor")


def favor_projection(head_dim: int, features: int, seed: int = 0, device=None) -> torch.Tensor:
    """Performer's orthogonal random projection ``(features, head_dim)``: stacked blocks of
    orthonormal rows (QR of Gaussian matrices), each row rescaled to a chi(D)-distributed
    norm so rows are marginally Gaussian. Deterministic in ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    blocks = []
    for _ in range(-(-features // head_dim)):
        qmat, _ = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=g, dtype=torch.float64))
        blocks.append(qmat.T)
    w = torch.cat(blocks, dim=0)[:features]
    norms = torch.randn(features, head_dim, generator=g, dtype=torch.float64).norm(dim=1)
    return (w * norms[:, None]).to(device=device, dtype=torch.float32)


def feature_map_fn(feature_map, *, scale: float, q_len: int, kv_len: int, normalize: bool,
                   cosformer_len: Optional[int], favor_features: Optional[int], favor_seed: int, head_dim: int,
                   device) -> Callable:
    """``φ(x, positions, is_query) -> features`` for a feature map option."""
    if callable(feature_map):
        return lambda x, pos, is_query: feature_map(x)
    if feature_map == "elu":
        return lambda x, pos, is_query: F.elu(x) + 1
    if feature_map == "relu":
        return lambda x, pos, is_query: F.relu(x)
    if feature_map == "identity":
        return lambda x, pos, is_query: x
    if feature_map == "cosformer":
        if cosformer_len is not None and max(q_len, kv_len) > cosformer_len:
            raise AttentionInputError(
                f"cosformer_len={cosformer_len} is shorter than the sequence ({max(q_len, kv_len)} positions): "
                "cos(π (i - j) / 2M) would turn negative; use cosformer_len >= the longest sequence"
            )
        M = float(cosformer_len or max(q_len, kv_len))

        def cosformer(x, pos, is_query):
            ang = (math.pi / 2) * pos.to(x.dtype).view(1, 1, -1, 1) / M
            r = F.relu(x)
            return torch.cat([r * torch.cos(ang), r * torch.sin(ang)], dim=-1)

        return cosformer
    if feature_map == "favor":
        m = int(favor_features or head_dim)
        w = favor_projection(head_dim, m, favor_seed, device)

        def favor(x, pos, is_query):
            xs = x * math.sqrt(scale)
            proj = xs @ w.to(x.dtype).T - (xs * xs).sum(-1, keepdim=True) / 2
            if is_query and normalize:  # a per-row constant: cancels in the normalisation
                proj = proj - proj.amax(dim=-1, keepdim=True).detach()
            return torch.exp(proj) / math.sqrt(m)

        return favor
    raise AttentionInputError(
        f"feature_map must be one of {', '.join(FEATURE_MAPS)} or a callable, got {feature_map!r}"
    )


def _features(q, k, key_padding_mask, causal, scale, opts):
    """φ(q), φ(k) in the compute dtype with k repeated to the query heads and padded keys zeroed."""
    Hq, Nq, Nk = q.shape[1], q.shape[2], k.shape[2]
    ct = compute_dtype(q.dtype)
    phi = feature_map_fn(opts["feature_map"], scale=scale, q_len=Nq, kv_len=Nk, normalize=opts["normalize"],
                         cosformer_len=opts["cosformer_len"], favor_features=opts["favor_features"],
                         favor_seed=opts["favor_seed"], head_dim=q.shape[-1], device=q.device)
    q_pos = torch.arange(Nq, device=q.device) + (Nk - Nq) + opts.get("position_offset", 0)
    k_pos = torch.arange(Nk, device=q.device) + opts.get("position_offset", 0)
    fq = phi(q.to(ct), q_pos, True)
    fk = phi(repeat_kv(k, Hq).to(ct), k_pos, False)
    if key_padding_mask is not None:
        fk = fk * key_padding_mask.view(k.shape[0], 1, Nk, 1).to(ct)
    return fq, fk


def _finish(out, normalize, eps):
    if normalize:
        return _linear.split_normalizer(out, eps)
    return out * torch.rsqrt(out.pow(2).mean(dim=-1, keepdim=True) + eps)


def reference(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
              return_weights=False, feature_map: Union[str, Callable] = "elu", normalize: bool = True,
              eps: float = 1e-6, cosformer_len: Optional[int] = None, favor_features: Optional[int] = None,
              favor_seed: int = 0):
    """Linear attention with the explicit N×N kernel matrix ``φ(Q) φ(K)ᵀ``.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    opts = dict(feature_map=feature_map, normalize=normalize, cosformer_len=cosformer_len,
                favor_features=favor_features, favor_seed=favor_seed)
    fq, fk = _features(q, k, key_padding_mask, causal, scale, opts)
    Nq, Nk = q.shape[2], k.shape[2]
    w = fq @ fk.transpose(-1, -2)  # (B, Hq, Nq, Nk)
    if causal:
        w = w * torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).tril(diagonal=Nk - Nq)
    vv = repeat_kv(v, q.shape[1]).to(w.dtype)
    if normalize:
        weights = w / (w.sum(dim=-1, keepdim=True) + eps)
        out = weights @ vv
    else:
        weights = w
        out = _finish(w @ vv, False, eps)
    out = out.to(q.dtype)
    return (out, weights.to(q.dtype)) if return_weights else out


def chunk_attention(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
                    return_weights=False, feature_map="elu", normalize=True, eps=1e-6, cosformer_len=None,
                    favor_features=None, favor_seed=0, chunk: int = _linear.DEFAULT_CHUNK):
    """``φ(K)ᵀV`` first (noncausal) or the chunked causal scan: O(N) time and memory."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    opts = dict(feature_map=feature_map, normalize=normalize, cosformer_len=cosformer_len,
                favor_features=favor_features, favor_seed=favor_seed)
    if causal and q.shape[2] == k.shape[2]:
        # self-attention: whole pipeline segment by segment (small temporaries, state carried)
        opts["cosformer_len"] = cosformer_len or q.shape[2]

        def run_segment(q_s, k_s, v_s, kpm_s, offset, state):
            fq, fk = _features(q_s, k_s, kpm_s, True, scale, {**opts, "position_offset": offset})
            vv = repeat_kv(v_s, q_s.shape[1]).to(fq.dtype)
            if kpm_s is not None:
                vv = vv * kpm_s.view(v_s.shape[0], 1, -1, 1).to(vv.dtype)
            if normalize:
                vv = _linear.with_ones(vv)
            out, state = _linear.causal_linear(fq, fk, vv, chunk=chunk, initial_state=state, return_state=True)
            return _finish(out, normalize, eps).to(q.dtype), state

        return _linear.causal_segments(q, k, v, key_padding_mask, run_segment, chunk)
    fq, fk = _features(q, k, key_padding_mask, causal, scale, opts)
    vv = repeat_kv(v, q.shape[1]).to(fq.dtype)
    if key_padding_mask is not None:
        vv = vv * key_padding_mask.view(v.shape[0], 1, -1, 1).to(vv.dtype)
    if normalize:
        vv = _linear.with_ones(vv)
    out = _linear.causal_aligned(fq, fk, vv, chunk=chunk) if causal else _linear.noncausal_linear(fq, fk, vv)
    return _finish(out, normalize, eps).to(q.dtype)


class LinearState:
    """Decoding state: ``S = Σ φ(k_j) [v_j, 1]ᵀ`` per query head and the position."""

    def __init__(self):
        self.S = None
        self.position = 0

    def nbytes(self) -> int:
        return 0 if self.S is None else self.S.numel() * self.S.element_size()


def init_state(batch_size, kv_heads, head_dim, v_dim, *, dtype=torch.float32, device=None, max_len=None,
               feature_map="elu", normalize=True, eps=1e-6, cosformer_len=None, favor_features=None, favor_seed=0,
               chunk=_linear.DEFAULT_CHUNK):
    if feature_map == "cosformer" and cosformer_len is None:
        raise AttentionInputError("decoding with feature_map='cosformer' needs cosformer_len (the M of cos(π i / 2M))")
    return LinearState()


def step(state: LinearState, q, k, v, *, scale, impl="auto", feature_map="elu", normalize=True, eps=1e-6,
         cosformer_len=None, favor_features=None, favor_seed=0, chunk=_linear.DEFAULT_CHUNK):
    """The next T tokens from the constant-size state (a chunked scan over just them)."""
    if feature_map == "cosformer" and state.position + q.shape[2] > cosformer_len:
        raise AttentionInputError(
            f"decoding past cosformer_len={cosformer_len} (position {state.position + q.shape[2]}): "
            "make the state with a larger cosformer_len"
        )
    opts = dict(feature_map=feature_map, normalize=normalize, cosformer_len=cosformer_len,
                favor_features=favor_features, favor_seed=favor_seed, position_offset=state.position)
    fq, fk = _features(q, k, None, True, scale, opts)
    vv = repeat_kv(v, q.shape[1]).to(fq.dtype)
    if normalize:
        vv = _linear.with_ones(vv)
    out, state.S = _linear.causal_linear(fq, fk, vv, chunk=chunk, initial_state=state.S, return_state=True)
    state.position += q.shape[2]
    return _finish(out, normalize, eps).to(q.dtype)


register(
    MethodSpec(
        name="linear",
        family="linear",
        summary="kernelized linear attention φ(Q)(φ(K)ᵀV): elu+1, relu, identity, cosFormer, FAVOR+ feature maps",
        paper="Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention",
        reference=reference,
        impls=[Impl("chunk", chunk_attention, description="φ(K)ᵀV first; causal: chunked intra/inter scan")],
        exact=False,
        time="O(N D^2)",
        memory="O(N D)",
        masks=False,
        decoding=True,
        state_size="F·(Dv+1) per query head, constant in N",
        init_state=init_state,
        step=step,
    )
)

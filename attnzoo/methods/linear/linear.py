"""Kernelized linear attention.

    o_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ  /  φ(q_i)ᵀ Σ_j φ(k_j)          (sums over visible keys j)

"Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention"
(Katharopoulos et al., ICML 2020). Computing ``φ(K)ᵀV`` first makes attention
linear in N; the causal form is an RNN whose state is ``S = Σ φ(k_j) v_jᵀ`` (F × Dv)
plus the normaliser ``z = Σ φ(k_j)``, computed here in chunks (see
:mod:`attnzoo.kernels.linear_scan`).

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

Implementations: ``reference`` (the explicit N×N kernel matrix) and ``chunk``
(``φ(K)ᵀV`` first, or the chunked causal scan, run segment by segment with the
positions carried: :func:`attnzoo.kernels.linear_scan.kernel_attention`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from ...errors import AttentionInputError
from ...kernels.caches import Decoder, RecurrentState
from ...kernels.linear_scan import (DEFAULT_CHUNK, check_chunk, dense_kernel_attention, kernel_attention,
                                    kernel_attention_step)
from ...registry import MethodOptions, method

FEATURE_MAPS = ("elu", "relu", "identity", "cosformer", "favor")


@dataclass(frozen=True)
class LinearOptions(MethodOptions):
    """Options of ``linear``.

    Attributes:
        feature_map: φ: ``"elu"`` (default), ``"relu"``, ``"identity"``, ``"cosformer"``,
            ``"favor"`` or a callable ``φ(x (B, H, N, D)) -> (B, H, N, F)``.
        normalize: divide by ``φ(q_i)·Σ φ(k_j)`` (True) or RMS-norm each head's output
            (False: TransNormer's NormAttention).
        eps: added to the denominator (or inside the RMS norm); None (default) for 1e-6,
            except FAVOR+'s normalised form, whose positive features need none: its
            denominator is then only guarded against zero, so Performer's stabilising
            shifts cancel exactly.
        cosformer_len: M of cosFormer's ``cos(π (i - j) / 2M)`` (default the longer of
            Nq, Nk; decoding needs it given).
        favor_features: FAVOR+ random features m (default D). ``favor_seed``: its projection.
        chunk: tokens per chunk of the causal scan (``chunk`` and decoding).
    """

    feature_map: Union[str, Callable] = "elu"
    normalize: bool = True
    eps: Optional[float] = None
    cosformer_len: Optional[int] = None
    favor_features: Optional[int] = None
    favor_seed: int = 0
    chunk: int = DEFAULT_CHUNK

    def validate(self) -> None:
        if not callable(self.feature_map) and self.feature_map not in FEATURE_MAPS:
            raise AttentionInputError(
                f"feature_map must be one of {', '.join(FEATURE_MAPS)} or a callable, got {self.feature_map!r}"
            )
        for name in ("cosformer_len", "favor_features"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise AttentionInputError(f"option {name} must be a positive int (or None), got {value!r}")
        check_chunk(self.chunk)


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
            # log-features: the pipeline shifts queries per row and keys per (batch, head)
            # before the exp (Performer's stabiliser), so neither underflows
            xs = x * math.sqrt(scale)
            return xs @ w.to(x.dtype).T - (xs * xs).sum(-1, keepdim=True) / 2 - 0.5 * math.log(m)

        favor.log_space = True
        return favor
    raise AttentionInputError(
        f"feature_map must be one of {', '.join(FEATURE_MAPS)} or a callable, got {feature_map!r}"
    )


def _phi(o: LinearOptions, scale: float, q_len: int, kv_len: int, head_dim: int, device) -> Callable:
    return feature_map_fn(o.feature_map, scale=scale, q_len=q_len, kv_len=kv_len, normalize=o.normalize,
                          cosformer_len=o.cosformer_len, favor_features=o.favor_features, favor_seed=o.favor_seed,
                          head_dim=head_dim, device=device)


def _output(o: LinearOptions) -> str:
    return "normalize" if o.normalize else "rms"


def _eps(o: LinearOptions) -> float:
    if o.eps is not None:
        return float(o.eps)
    return 0.0 if (o.feature_map == "favor" and o.normalize) else 1e-6


@method("linear", options=LinearOptions,
        summary="kernelized linear attention φ(Q)(φ(K)ᵀV): elu+1, relu, identity, cosFormer, FAVOR+ feature maps",
        paper="Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention",
        time="O(N D^2)", memory="O(N D)", masks=False)
def linear(q, k, v, call):
    """Linear attention with the explicit N×N kernel matrix ``φ(Q) φ(K)ᵀ``.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    o = call.options
    phi = _phi(o, call.scale, call.q_len, call.kv_len, call.head_dim, q.device)
    return dense_kernel_attention(q, k, v, phi, causal=call.causal, key_mask=call.key_mask, output=_output(o),
                                  eps=_eps(o), return_weights=call.return_weights)


@linear.impl("chunk", options=("chunk",), description="φ(K)ᵀV first; causal: chunked intra/inter scan")
def chunk_attention(q, k, v, call):
    """``φ(K)ᵀV`` first (noncausal) or the chunked causal scan: O(N) time and memory."""
    o = call.options
    phi = _phi(o, call.scale, call.q_len, call.kv_len, call.head_dim, q.device)
    return kernel_attention(q, k, v, phi, causal=call.causal, key_mask=call.key_mask, output=_output(o), eps=_eps(o),
                            chunk=o.chunk)


@linear.decodes
class LinearDecoder(Decoder):
    """Decoding state: ``S = Σ φ(k_j) [v_j, 1]ᵀ`` per query head and the position (a
    :class:`~attnzoo.kernels.caches.RecurrentState`); each step is a chunked scan over
    just the new tokens, started from ``S``."""

    state_size = "F·(Dv+1) per query head, constant in N"
    options = ("chunk",)

    def init_state(self, batch_size, kv_heads, head_dim, v_dim, *, dtype, device, max_len, options):
        if options.feature_map == "cosformer" and options.cosformer_len is None:
            raise AttentionInputError(
                "decoding with feature_map='cosformer' needs cosformer_len (the M of cos(π i / 2M))")
        return RecurrentState(S=None, key_shift=None)

    def step(self, run, state, q, k, v, *, scale, impl, options):
        """The next T tokens from the constant-size state (a chunked scan over just them)."""
        T = q.shape[2]
        if options.feature_map == "cosformer" and options.cosformer_len is None:
            raise AttentionInputError(
                "decoding with feature_map='cosformer' needs cosformer_len (the M of cos(π i / 2M))")
        if options.feature_map == "cosformer" and state.position + T > options.cosformer_len:
            raise AttentionInputError(
                f"decoding past cosformer_len={options.cosformer_len} (position {state.position + T}): "
                "make the state with a larger cosformer_len"
            )
        phi = _phi(options, scale, T, T, q.shape[-1], q.device)
        return kernel_attention_step(state, q, k, v, phi, output=_output(options), eps=_eps(options),
                                     chunk=options.chunk)

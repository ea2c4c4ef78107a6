"""SOFT: softmax-free attention with a Gaussian kernel and a Nyström approximation.

    S(x, y) = exp(-scale · ‖x - y‖² / 2)             (scale = D^-½: exp(-‖x - y‖² / 2√d))
    Q̃ = AvgPool_m(Q)                                 (m landmarks, adaptive pooling over tokens)
    A = S(Q, Q̃)  (Nq × m),  B = S(Q̃, Q̃)  (m × m),  C = S(Q̃, K)  (m × Nk)
    O = A · B⁺ · C · V                              (no row normalisation)

"SOFT: Softmax-free Transformer with Linear Complexity" (Lu et al., NeurIPS 2021) /
"Softmax-free Linear Transformers" (Lu et al., IJCV 2024). Softmax attention cannot
be approximated by a low-rank factorisation of its kernel because of the row
normalisation; SOFT drops the softmax for a Gaussian kernel of the query-key
distance (a symmetric positive semi-definite kernel, with Q and K tied: ``W_q = W_k``)
and approximates the full ``N × N`` kernel matrix ``S(Q, Q)`` by the Nyström method
``A B⁺ Aᵀ`` over ``m`` landmarks (``num_landmarks``, capped at ``Nq``). ``B⁺``, the
Moore–Penrose inverse, is the paper's Newton–Raphson iteration

    X₀ = Bᵀ / (‖B‖₁ ‖B‖_∞),     X_{k+1} = 2 X_k - X_k B X_k       (``newton_iters`` times)

which converges to ``B⁺`` (quadratically once close) using matmuls only. For the
symmetric ``B`` here the start leaves ``I - B X₀`` with eigenvalues up to
``1 - (λ_min/λ_max)²``, so it takes about ``log₂(cond(B)²) + 5`` steps: the paper's 20
resolve condition numbers up to a few hundred. Landmarks that lie close together
(means of few tokens in a low dimension, or of long smooth sequences) make ``B``
worse conditioned; raise ``newton_iters`` there (``B⁺`` is then only approximated,
the same way in every implementation).

[J] Untied Q and K: the library takes ``q`` and ``k`` separately, so the right factor
is ``C = S(Q̃, K)`` (``= Aᵀ`` when ``K = Q``) and the landmarks come from Q. This also
makes noncausal cross-attention meaningful (``Nq != Nk``): ``A`` and ``B`` live on the
query side, ``C`` is the only factor that sees the keys. There is no causal form
(landmarks pool over the whole query sequence), so no causal patterns and no decoding.

[J] Key padding zeroes the padded keys' columns of ``C``; the landmarks are pooled
over all of Q (padding is on the keys; in padded self-attention the pad positions'
queries still enter the landmarks, as in any batched run of the paper's model).

[J] Backward: plain autograd through the ``newton_iters`` iterations (the paper's
released code does the same for its PyTorch kernel); no one-shot analytic gradient of
the pseudo-inverse. The reference and the fast path share :func:`newton_pinv`, so
they differ only in rounding.

[J] ``scale`` (default ``D^-½``) plays ``1/√d``: ``S = exp(-scale‖x - y‖²/2)``. The
paper's model also adds a depthwise convolution over V to the output; that is not
part of this attention function.

Time O(N m D + N m Dv + iters·m³), memory O(N·m) for ``nystrom`` (factors applied
right to left: ``A (B⁺ (C V))``); the reference builds the N×N approximate matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import AttentionInputError
from ...kernels.common import compute_dtype, repeat_kv
from ...registry import MethodOptions, method


@dataclass(frozen=True)
class SoftOptions(MethodOptions):
    """Options of ``softmax_free``.

    Attributes:
        num_landmarks: m landmarks (capped at Nq).
        newton_iters: Newton–Raphson steps for the pseudo-inverse ``B⁺``.
    """

    num_landmarks: int = 32
    newton_iters: int = 20

    def validate(self) -> None:
        _check(self.num_landmarks, self.newton_iters)

    @classmethod
    def for_length(cls, n: int) -> dict:
        """A quarter of the tokens as landmarks at short lengths, the default 32 from 128 on."""
        return {"num_landmarks": min(32, max(2, n // 4))}


def _check(num_landmarks, newton_iters) -> None:
    if isinstance(num_landmarks, bool) or not isinstance(num_landmarks, int) or num_landmarks < 1:
        raise AttentionInputError(f"softmax_free: num_landmarks must be an int >= 1, got {num_landmarks!r}")
    if isinstance(newton_iters, bool) or not isinstance(newton_iters, int) or newton_iters < 0:
        raise AttentionInputError(f"softmax_free: newton_iters must be an int >= 0, got {newton_iters!r}")


def newton_pinv(b: torch.Tensor, iters: int) -> torch.Tensor:
    """Moore–Penrose inverse of each ``(m, m)`` matrix in ``b (..., m, m)`` by the
    Newton–Raphson (Newton–Schulz) iteration: ``X₀ = Bᵀ / (‖B‖₁ ‖B‖_∞)``,
    ``X_{k+1} = 2X_k - X_k B X_k``. ``‖·‖₁`` is the largest column sum of ``|B|``,
    ``‖·‖_∞`` the largest row sum; the start guarantees convergence."""
    norm_1 = b.abs().sum(dim=-2).amax(dim=-1)
    norm_inf = b.abs().sum(dim=-1).amax(dim=-1)
    x = b.transpose(-1, -2) / (norm_1 * norm_inf)[..., None, None]
    for _ in range(iters):
        x = 2 * x - x @ b @ x
    return x


def pooling_matrix(n: int, m: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """``(m, n)`` averaging matrix of adaptive average pooling: landmark ``a`` is the mean
    of tokens ``⌊a n / m⌋ .. ⌈(a+1) n / m⌉ - 1``."""
    a = torch.arange(m, device=device)
    start, end = (a * n) // m, ((a + 1) * n + m - 1) // m
    j = torch.arange(n, device=device)
    inside = ((j.view(1, -1) >= start.view(-1, 1)) & (j.view(1, -1) < end.view(-1, 1))).to(dtype)
    return inside / inside.sum(dim=-1, keepdim=True)


def gaussian_kernel(x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """``exp(-scale ‖x_i - y_j‖² / 2)`` from the explicit differences: ``(..., n, D), (..., m, D) -> (..., n, m)``."""
    diff = x.unsqueeze(-2) - y.unsqueeze(-3)
    return torch.exp(-0.5 * scale * (diff * diff).sum(dim=-1))


@method("softmax_free", options=SoftOptions,
        summary="SOFT: Gaussian-kernel attention without softmax, Nyström low rank with Newton–Raphson pseudo-inverse",
        paper="SOFT: Softmax-free Transformer with Linear Complexity (Softmax-free Linear Transformers)",
        patterns=("noncausal_self", "noncausal_cross"), time="O(N m (D + Dv) + iters·m^3)",
        memory="O(N·m) nystrom, O(N^2) reference", masks=False, short_impl="nystrom",
        rows_independent=False)  # the landmarks pool over all the queries
def softmax_free(q, k, v, call):
    """SOFT with the explicit N×N approximate attention matrix ``A B⁺ C``.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    ``num_landmarks``: m (capped at Nq). ``newton_iters``: Newton–Raphson steps for B⁺.
    """
    num_landmarks, newton_iters = call.options.num_landmarks, call.options.newton_iters
    key_mask, scale = call.key_mask, call.scale
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    ct = compute_dtype(q.dtype)
    qc, kc, vc = q.to(ct), repeat_kv(k, Hq).to(ct), repeat_kv(v, Hq).to(ct)
    m = min(num_landmarks, Nq)
    q_land = pooling_matrix(Nq, m, ct, q.device) @ qc  # Q̃ (B, Hq, m, D)
    a = gaussian_kernel(qc, q_land, scale)  # S(Q, Q̃)   (Nq × m)
    b_pinv = newton_pinv(gaussian_kernel(q_land, q_land, scale), newton_iters)  # S(Q̃, Q̃)⁺  (m × m)
    c = gaussian_kernel(q_land, kc, scale)  # S(Q̃, K)   (m × Nk)
    if key_mask is not None:
        c = c.masked_fill(~key_mask.view(B, 1, 1, Nk), 0.0)
    weights = a @ b_pinv @ c  # the N×N approximate attention matrix
    out = (weights @ vc).to(q.dtype)
    return (out, weights.to(q.dtype)) if call.return_weights else out


def _sq_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``‖x_i - y_j‖² = ‖x_i‖² + ‖y_j‖² - 2 x_i·y_j`` (clamped at 0), without the
    ``(n, m, D)`` difference tensor."""
    d2 = (x * x).sum(-1).unsqueeze(-1) + (y * y).sum(-1).unsqueeze(-2) - 2 * (x @ y.transpose(-1, -2))
    return d2.clamp(min=0.0)


@softmax_free.impl("nystrom", description="Nyström factors right to left, A (B⁺ (S(Q̃,K) V)), O(N·m) memory")
def nystrom_attention(q, k, v, call):
    """The Nyström factors applied right to left, ``A (B⁺ (C V))``: O(N m) memory, never
    N×N. GQA without copying K/V: each k/v head's ``C V`` serves the landmarks of all
    its query heads at once."""
    num_landmarks, newton_iters = call.options.num_landmarks, call.options.newton_iters
    key_mask, scale = call.key_mask, call.scale
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    ct = compute_dtype(q.dtype)
    qc = q.to(ct)
    m = min(num_landmarks, Nq)
    q_land = F.adaptive_avg_pool1d(qc.reshape(B * Hq, Nq, D).transpose(1, 2), m).transpose(1, 2)
    q_land = q_land.reshape(B, Hq, m, D)
    a = torch.exp(-0.5 * scale * _sq_dist(qc, q_land))  # (B, Hq, Nq, m)
    b_pinv = newton_pinv(torch.exp(-0.5 * scale * _sq_dist(q_land, q_land)), newton_iters)
    c = torch.exp(-0.5 * scale * _sq_dist(q_land.reshape(B, Hkv, G * m, D), k.to(ct)))  # (B, Hkv, G·m, Nk)
    if key_mask is not None:
        c = c * key_mask.view(B, 1, 1, Nk).to(ct)
    cv = (c @ v.to(ct)).reshape(B, Hq, m, Dv)
    return (a @ (b_pinv @ cv)).to(q.dtype)


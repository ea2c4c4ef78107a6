"""InLine: injective linear attention with a local term.

    κ_ij   = (scale / n_i) · φ(q_i)ᵀ φ(k_j)                                  [J]
    InL_ij = κ_ij - (1 / n_i) Σ_{s ∈ V_i} κ_is + 1 / n_i        (j ∈ V_i; 0 otherwise)
    O_i    = Σ_j InL_ij v_j  +  DWC(V)_i

"Bridging the Divide: Reconsidering Softmax and Linear Attention" (Han et al.,
NeurIPS 2024). Plain linear attention divides by ``φ(q_i)·Σφ(k_s)``, which maps
every query with the same direction to the same attention distribution (it is not
injective); InLine subtracts the row mean of the kernel instead and adds ``1/n``, so
the weights of a row always sum to 1 and distinct queries give distinct
distributions. ``V_i`` is the set of keys query ``i`` can see and ``n_i = |V_i|``:
all ``Nk`` keys noncausal, ``j <= i + Nk - Nq`` causal (lower-right), padded keys
never (they are left out of every sum and of ``n_i``). Feature maps
(``feature_map=``): ``"relu"`` (the default), ``"elu"`` (``elu + 1``), ``"identity"``.

Summed over ``j`` the output needs only prefix sums, so it is linear attention:

    O_i = a_iᵀ S_i + (1 - a_iᵀ z_i) · u_i / n_i,     a_i = scale · φ(q_i) / n_i
    S_i = Σ_{j∈V_i} φ(k_j) v_jᵀ,   z_i = Σ_{j∈V_i} φ(k_j),   u_i = Σ_{j∈V_i} v_j

``S`` and ``z`` come from the chunked kernel of :mod:`attnzoo.kernels.linear_scan` (``z`` as the column of
ones appended to ``v``), ``u`` and ``n`` from plain cumulative sums of vectors.

The local term is the paper's depthwise convolution over the values, which restores
the locality linear attention lacks: one 1-D kernel of ``k`` taps per query head and
value channel, ``local_weight`` of shape ``(Hq, Dv, k)`` (broadcastable); "same"
padding noncausal (``DWC(V)_i = Σ_t w_t v_{i-⌊(k-1)/2⌋+t}``, PyTorch's
``padding="same"``), left padding only causal (``Σ_t w_t v_{i-(k-1)+t}``), so it
stays causal and decodes with the last ``k - 1`` values. It is learnable:
:class:`InLineAttention` (``attnzoo.build("inline", heads=..., head_dim=...)``) holds
the weight; the functional form takes it as ``local_weight=`` (None: no local term).

[J] Kernel scale: eq. 5 of the paper writes ``φ(Q_i)ᵀφ(K_j)``; the authors' code
scales it by ``scale / n`` (its comment: the factor "can be equivalently achieved by
scaling φ(Q)", omitted from eq. 5 for simplicity). We follow the code, with the
API's ``scale`` (default ``D^-½``) and the row's own ``n_i``: it keeps the outputs
O(|v|) at any length, and decoding needs nothing but ``n_i``. Pass ``scale`` to change
the temperature; the weights sum to 1 whatever it is.

[J] The local term needs queries aligned with the values: self-attention, or causal
attention with lower-right alignment (query ``i`` sits at key position
``i + Nk - Nq``, as in decoding). :class:`InLineAttention` leaves it out for
cross-attention; the functional form refuses ``local_weight`` for noncausal
``Nq != Nk``. The taps are per query head (GQA repeats the values first), there is no
bias, padded values enter it as zeros, and ``return_weights`` gives the InL matrix
of the global term only (a per-channel convolution is no single attention matrix).

Time O(N F Dv) (+ O(N C F) causal, + O(N Dv k) local), memory O(N·C + N·Dv) per head;
the reference builds the N×N matrix. Decoding keeps a constant-size state
``(S, z, u, n, last k-1 values)``. Accepts key padding, not arbitrary masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ...errors import AttentionInputError, fmt_shape
from ...kernels.caches import Decoder
from ...kernels.common import compute_dtype, repeat_kv
from ...kernels.linear_scan import (DEFAULT_CHUNK, causal_aligned, causal_linear, check_chunk, noncausal_linear,
                                    with_ones)
from ...registry import MethodOptions, method

FEATURE_MAPS = ("relu", "elu", "identity")


@dataclass(frozen=True)
class InLineOptions(MethodOptions):
    """Options of ``inline``.

    Attributes:
        feature_map: φ: ``"relu"`` (default), ``"elu"`` (elu + 1) or ``"identity"``.
        local_weight: ``(Hq, Dv, k)`` taps (broadcastable) of the depthwise convolution
            over V, or None (no local term).
        chunk: tokens per chunk of the causal scan (``chunk`` and decoding).
    """

    feature_map: str = "relu"
    local_weight: Optional[torch.Tensor] = None
    chunk: int = DEFAULT_CHUNK

    def validate(self) -> None:
        _check_feature_map(self.feature_map)
        check_chunk(self.chunk)


def feature(x: torch.Tensor, feature_map: str) -> torch.Tensor:
    """φ(x) for a feature map name."""
    if feature_map == "relu":
        return F.relu(x)
    if feature_map == "elu":
        return F.elu(x) + 1
    return x


def _check_feature_map(feature_map) -> None:
    if feature_map not in FEATURE_MAPS:
        raise AttentionInputError(f"inline: feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")


def _local(local_weight, causal, q_heads, q_len, kv_len, v_dim, dtype) -> Optional[torch.Tensor]:
    """The depthwise-convolution taps as ``(Hq, Dv, k)`` in ``dtype``, or None; checks the
    weight and that the queries are aligned with the values."""
    if local_weight is None:
        return None
    shape = (q_heads, v_dim, "k")
    if not isinstance(local_weight, torch.Tensor):
        raise AttentionInputError(f"local_weight must be a tensor broadcastable to {shape}, got {type(local_weight).__name__}")
    if not 1 <= local_weight.dim() <= 3 or local_weight.shape[-1] < 1:
        raise AttentionInputError(f"local_weight must be a tensor broadcastable to {shape}, got shape {fmt_shape(local_weight)}")
    target = (q_heads, v_dim, local_weight.shape[-1])
    try:
        w = torch.broadcast_to(local_weight, target)
    except RuntimeError:
        raise AttentionInputError(f"local_weight of shape {fmt_shape(local_weight)} does not broadcast to "
                                  f"(Hq, Dv, k) = {fmt_shape(target)}") from None
    if not causal and q_len != kv_len:
        raise AttentionInputError(
            f"inline: the local term (local_weight) convolves the values at each query's position, so it needs "
            f"self-attention (Nq == Nk) or causal lower-right alignment; got noncausal Nq={q_len}, Nk={kv_len}. "
            "Leave local_weight=None for cross-attention (InLineAttention does)"
        )
    return w.to(dtype)


def _local_reference(vv: torch.Tensor, w: torch.Tensor, causal: bool, q_len: int) -> torch.Tensor:
    """``DWC(V)`` at each query's position, tap by tap: ``Σ_t w_t v_{p_i - left + t}``
    (values outside ``[0, Nk)`` are 0). ``vv (B, Hq, Nk, Dv)``, ``w (Hq, Dv, k)``."""
    B, H, Nk, Dv = vv.shape
    ks = w.shape[-1]
    left = ks - 1 if causal else (ks - 1) // 2
    pos = torch.arange(q_len, device=vv.device) + (Nk - q_len if causal else 0)  # p_i: query i's key position
    out = vv.new_zeros(B, H, q_len, Dv)
    for t in range(ks):
        idx = pos - left + t
        valid = ((idx >= 0) & (idx < Nk)).to(vv.dtype).view(1, 1, q_len, 1)
        out = out + w[:, :, t].reshape(1, H, 1, Dv) * vv[:, :, idx.clamp(0, Nk - 1)] * valid
    return out


@method("inline", options=InLineOptions,
        summary="injective linear attention: subtract the kernel's row mean, add 1/n (rows sum to 1) + local DWC",
        paper="Bridging the Divide: Reconsidering Softmax and Linear Attention",
        time="O(N D Dv) (+ O(N C D) causal)", memory="O(N·C + N·Dv) chunk, O(N^2) reference", masks=False)
def inline(q, k, v, call):
    """InLine attention with the explicit N×N matrix of injective weights.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    ``feature_map``: "relu", "elu" (elu + 1) or "identity". ``local_weight``:
    ``(Hq, Dv, k)`` taps of the depthwise convolution over V, or None.
    """
    feature_map, local_weight = call.options.feature_map, call.options.local_weight
    causal, key_mask, scale = call.causal, call.key_mask, call.scale
    B, Hq, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    ct = compute_dtype(q.dtype)
    w_local = _local(local_weight, causal, Hq, Nq, Nk, Dv, ct)
    fq = feature(q.to(ct), feature_map)
    fk = feature(repeat_kv(k, Hq).to(ct), feature_map)
    vv = repeat_kv(v, Hq).to(ct)
    allowed = call.masker.full()  # j ∈ V_i
    if allowed is None:
        allowed = torch.ones(1, 1, Nq, Nk, dtype=torch.bool, device=q.device)
    n = allowed.sum(dim=-1, keepdim=True).to(ct)  # n_i
    inv_n = 1.0 / n.clamp(min=1)
    kappa = (scale * (fq @ fk.transpose(-1, -2)) * inv_n).masked_fill(~allowed, 0.0)  # κ_ij
    weights = (kappa - kappa.sum(dim=-1, keepdim=True) * inv_n + inv_n).masked_fill(~allowed, 0.0)  # InL_ij
    out = weights @ vv
    if w_local is not None:
        if key_mask is not None:
            vv = vv * key_mask.view(B, 1, Nk, 1).to(ct)
        out = out + _local_reference(vv, w_local, causal, Nq)
    out = out.to(q.dtype)
    return (out, weights.to(q.dtype)) if call.return_weights else out


def _at_query_positions(cum: torch.Tensor, q_len: int, causal: bool) -> torch.Tensor:
    """Rows of a prefix sum over keys ``(..., Nk, X)`` at each query's last visible key:
    row ``i + Nk - Nq`` causal (zeros where that is negative), the last row noncausal."""
    Nk = cum.shape[-2]
    if not causal:
        return cum[..., -1:, :]
    off = Nk - q_len
    if off >= 0:
        return cum[..., off:, :]
    return torch.cat([cum.new_zeros(*cum.shape[:-2], -off, cum.shape[-1]), cum], dim=-2)


def _combine(num_den: torch.Tensor, u: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``O = a·S + (1 - a·z) u / n`` from ``num_den = [scale φ(q)·S, scale φ(q)·z]``, the
    value sums ``u`` and the counts ``n`` (rows with ``n = 0`` give 0)."""
    inv_n = 1.0 / n.clamp(min=1)
    num, den = num_den[..., :-1], num_den[..., -1:]
    return num * inv_n + (1.0 - den * inv_n) * (u * inv_n)


def _conv(seq: torch.Tensor, w: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """Depthwise 1-D convolution along tokens: ``seq (B, H, L, Dv)``, ``w (H, Dv, k)``,
    zero padding ``left``/``right`` -> ``(B, H, L + left + right - k + 1, Dv)``."""
    B, H, L, Dv = seq.shape
    x = seq.permute(0, 1, 3, 2).reshape(B, H * Dv, L)
    y = F.conv1d(F.pad(x, (left, right)), w.reshape(H * Dv, 1, w.shape[-1]), groups=H * Dv)
    return y.reshape(B, H, Dv, -1).permute(0, 1, 3, 2)


def _local_fast(vv: torch.Tensor, w: torch.Tensor, causal: bool, q_len: int) -> torch.Tensor:
    ks = w.shape[-1]
    if not causal:
        left = (ks - 1) // 2
        return _conv(vv, w, left, ks - 1 - left)
    return _at_query_positions(_conv(vv, w, ks - 1, 0), q_len, True)


@inline.impl("chunk", options=("chunk",),
             description="φ(K)ᵀ[V,1] noncausal / chunked causal scan, prefix sums of V and counts, conv1d local term")
def chunk_attention(q, k, v, call):
    """Linear-time InLine: ``φ(K)ᵀ[V, 1]`` (noncausal) or the chunked causal scan of
    :mod:`attnzoo.kernels.linear_scan` (lower-right aligned), value sums and counts as
    cumulative sums, the local term as a grouped ``conv1d``. Never builds an N×N matrix;
    autograd works."""
    o = call.options
    feature_map, local_weight, chunk = o.feature_map, o.local_weight, o.chunk
    causal, key_mask, scale = call.causal, call.key_mask, call.scale
    B, Hq, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    ct = compute_dtype(q.dtype)
    w_local = _local(local_weight, causal, Hq, Nq, Nk, Dv, ct)
    fq = feature(q.to(ct), feature_map) * scale
    fk = feature(repeat_kv(k, Hq).to(ct), feature_map)
    vv = repeat_kv(v, Hq).to(ct)
    if key_mask is not None:
        keep = key_mask.view(B, 1, Nk, 1).to(ct)
        fk, vv = fk * keep, vv * keep
        ones = keep.expand(B, 1, Nk, 1)
    else:
        ones = vv.new_ones(1, 1, Nk, 1)
    if causal:
        num_den = causal_aligned(fq, fk, with_ones(vv), chunk=chunk)
        u = _at_query_positions(torch.cumsum(vv, dim=2), Nq, True)
        n = _at_query_positions(torch.cumsum(ones, dim=2), Nq, True)
    else:
        num_den = noncausal_linear(fq, fk, with_ones(vv))
        u = vv.sum(dim=2, keepdim=True)
        n = ones.sum(dim=2, keepdim=True)
    out = _combine(num_den, u, n)
    if w_local is not None:
        out = out + _local_fast(vv, w_local, causal, Nq)
    return out.to(q.dtype)


class InLineState:
    """Decoding state (constant size): ``S = Σ φ(k_j)[v_j, 1]ᵀ`` and ``u = Σ v_j`` per
    k/v head, the count ``n`` of tokens so far, and the last ``k - 1`` values (the
    causal local term's window)."""

    def __init__(self, batch_size, kv_heads, head_dim, v_dim, dtype, device):
        ct = compute_dtype(dtype)
        self.S = torch.zeros(batch_size, kv_heads, head_dim, v_dim + 1, dtype=ct, device=device)
        self.u = torch.zeros(batch_size, kv_heads, 1, v_dim, dtype=ct, device=device)
        self.count = 0
        self.tail = None  # (B, Hkv, k - 1, Dv), made by the first step that has a local term

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.S, self.u, self.tail) if t is not None)


@inline.decodes
class InLineDecoder(Decoder):
    """Decoding with the constant-size :class:`InLineState`: each step a chunked causal
    scan over just the new tokens, started from ``S``; ``u`` and ``n`` continue their
    prefix sums, the local term reads the kept ``k - 1`` values."""

    state_size = "Hkv·D·(Dv+1) + Hkv·Dv + 1 (+ Hkv·(k-1)·Dv with the local term) per sequence"
    options = ("chunk",)

    def init_state(self, batch_size, kv_heads, head_dim, v_dim, *, dtype, device, max_len, options):
        return InLineState(batch_size, kv_heads, head_dim, v_dim, dtype, device)

    def step(self, run, state, q, k, v, *, scale, impl, options):
        """The next T tokens from the constant-size state: a chunked causal scan over just
        them, started from ``S``; ``u`` and ``n`` continue their prefix sums."""
        feature_map, local_weight, chunk = options.feature_map, options.local_weight, options.chunk
        B, Hq, T, _ = q.shape
        Hkv, Dv = k.shape[1], v.shape[3]
        if tuple(state.S.shape) != (B, Hkv, k.shape[3], Dv + 1):
            raise AttentionInputError(
                f"new k {fmt_shape(k)} / v {fmt_shape(v)} do not match the state made for (B, Hkv, D, Dv) = "
                f"{fmt_shape(state.S.shape[:3] + (state.S.shape[3] - 1,))}"
            )
        ct = state.S.dtype
        w_local = _local(local_weight, True, Hq, T, T, Dv, ct)
        fq = feature(q.to(ct), feature_map) * scale
        fk = feature(k.to(ct), feature_map)
        vv = v.to(ct)
        v1 = with_ones(vv)
        num_den = causal_linear(fq, repeat_kv(fk, Hq), repeat_kv(v1, Hq), chunk=chunk,
                                initial_state=repeat_kv(state.S, Hq))
        u = repeat_kv(state.u + torch.cumsum(vv, dim=2), Hq)
        n = (state.count + torch.arange(1, T + 1, device=q.device, dtype=ct)).view(T, 1)
        out = _combine(num_den, u, n)
        if w_local is not None:
            ks = w_local.shape[-1]
            tail = (state.tail if state.tail is not None and state.tail.shape[2] == ks - 1
                    else vv.new_zeros(B, Hkv, ks - 1, Dv))
            seq = torch.cat([tail, vv], dim=2)  # the k - 1 values before the new ones, then the new ones
            out = out + _conv(repeat_kv(seq, Hq), w_local, 0, 0)
            state.tail = seq[:, :, seq.shape[2] - (ks - 1):]
        state.S = state.S + fk.transpose(-1, -2) @ v1
        state.u = state.u + vv.sum(dim=2, keepdim=True)
        state.count += T
        return out.to(q.dtype)


@inline.module_class
class InLineAttention(torch.nn.Module):
    """InLine attention with its learnable local term (the depthwise convolution over
    V); call it like the functional form: ``module(q, k, v, causal=..., impl=...)``.
    For cross-attention (``cross=True``, or ``Nq != Nk`` when not given) the local term
    is left out: the values are not aligned with the queries there.

    Args:
        heads, kv_heads: query and key/value heads (``kv_heads`` defaults to ``heads``).
        head_dim: D. ``v_dim``: Dv (default D).
        feature_map: φ, ``"relu"`` (default), ``"elu"`` or ``"identity"``.
        kernel_size: taps of the depthwise convolution (default 3).
    """

    def __init__(self, heads: int, head_dim: int, kv_heads: Optional[int] = None, v_dim: Optional[int] = None,
                 impl: str = "auto", feature_map: str = "relu", kernel_size: int = 3):
        super().__init__()
        _check_feature_map(feature_map)
        if int(kernel_size) < 1:
            raise AttentionInputError(f"inline: kernel_size must be >= 1, got {kernel_size}")
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.impl, self.feature_map = impl, feature_map
        self.local_weight = torch.nn.Parameter(torch.empty(heads, v_dim or head_dim, int(kernel_size)))
        # nn.Conv1d's default for a depthwise kernel: U(-1/√k, 1/√k)
        bound = int(kernel_size) ** -0.5
        torch.nn.init.uniform_(self.local_weight, -bound, bound)

    def forward(self, q, k, v, **kwargs):
        cross = kwargs.get("cross")
        cross = q.shape[2] != k.shape[2] if cross is None else cross
        kwargs.setdefault("impl", self.impl)
        return inline(q, k, v, feature_map=self.feature_map, local_weight=None if cross else self.local_weight,
                      **kwargs)

    def init_state(self, batch_size, kv_heads, head_dim, v_dim, *, dtype=torch.float32, device=None, max_len=None):
        return inline.init_state(batch_size, kv_heads, head_dim, v_dim, dtype=dtype, device=device, max_len=max_len,
                                 feature_map=self.feature_map)

    def step(self, state, q, k, v, *, scale=None, impl="auto"):
        return inline.step(state, q, k, v, scale=scale, impl=impl, feature_map=self.feature_map,
                           local_weight=self.local_weight)

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, kv_heads={self.kv_heads}, feature_map={self.feature_map!r}, "
                f"kernel_size={self.local_weight.shape[-1]}")


"""Exact softmax attention (scaled dot-product attention).

    S = scale * Q Kᵀ  [-> softcap * tanh(S / softcap)]  [+ ALiBi]  [masked: -inf]
    P = softmax(S, dim=-1)           (a row with nothing visible gives P = 0)
    O = dropout(P) V

"Attention Is All You Need" (Vaswani et al., 2017). Score modifiers: ALiBi
("Train Short, Test Long: Attention with Linear Biases Enables Input Length
Extrapolation") and tanh soft-capping (Gemma 2). Time O(N² D); memory O(N²) for
the reference, O(N · block) for ``tiled``.

Implementations:

* ``reference`` — the formula above with explicit N×N matrices, float32 (or
  float64) inside; can return the weights.
* ``sdpa`` — ``torch.nn.functional.scaled_dot_product_attention``.
* ``tiled`` — FlashAttention's algorithm in PyTorch ("FlashAttention: Fast and
  Memory-Efficient Exact Attention with IO-Awareness"): queries in chunks, keys
  in blocks, an online softmax (running max and sum) in the forward pass and a
  recomputing backward pass (a custom ``autograd.Function`` that saves only
  Q, K, V, O and the row log-sum-exp), so no N×N tensor ever exists. Blocks
  beyond the causal frontier are skipped; masks and mask_mods are evaluated one
  block at a time.
* ``flex`` — FlexAttention (compiled), for inference on CPU and anything on CUDA.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..decoding import KVCache, split_k_attention
from ..errors import AttentionInputError, UnsupportedImpl
from ..masks import and_masks, flex_available, tensor_mask
from ..registry import Impl, MethodSpec, register
from ._common import Masker, alibi_bias, compute_dtype, group_mask, make_masker, masked_softmax, repeat_kv, resolve_alibi


def apply_score_mods(s, *, softcap, slopes, qs, qe, ks, ke, offset, grouped=False):
    """Soft-capping then ALiBi on a score block ``(B, H, qe-qs, ke-ks)`` (or
    ``(B, Hkv, G, ...)`` when ``grouped``)."""
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if slopes is not None:
        bias = alibi_bias(slopes, qs, qe, ks, ke, offset).to(s.dtype)
        if grouped:
            bias = bias.view(1, s.shape[1], s.shape[2], qe - qs, ke - ks)
        s = s + bias
    return s


def reference(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
              return_weights=False, alibi=False, softcap: Optional[float] = None):
    """Softmax attention with explicit N×N matrices.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    ``alibi``: True for the standard slopes, or a tensor of per-head slopes.
    ``softcap``: tanh soft-capping value (None = off).
    """
    check_softcap(softcap)
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    ct = compute_dtype(q.dtype)
    k, v = repeat_kv(k, Hq).to(ct), repeat_kv(v, Hq).to(ct)
    s = (q.to(ct) @ k.transpose(-1, -2)) * scale
    slopes = resolve_alibi(alibi, Hq, q.device, ct)
    s = apply_score_mods(s, softcap=softcap, slopes=slopes, qs=0, qe=Nq, ks=0, ke=Nk, offset=Nk - Nq)
    p = masked_softmax(s, make_masker(q, k, causal, mask, key_padding_mask).full())
    weights = p
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    out = (p @ v).to(q.dtype)
    return (out, weights.to(q.dtype)) if return_weights else out


# ------------------------------------------------------------------------------ sdpa

#: PyTorch's fused CPU kernel (vectorised exp, blocked accumulation) is measured at up
#: to 5x the error of the explicit float32 reference once logits are sharp (e.g. queries
#: scaled by a temperature of 3-4); it is the library's ground truth, so its own
#: tolerance factor is wider than the default 3.
SDPA_FUDGE = 8.0


def _sdpa_supports(call):
    if call.options.get("softcap") is not None:
        return "SDPA has no tanh soft-capping; use impl='tiled'"
    return None


def sdpa_attention(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
                   return_weights=False, alibi=False, softcap=None):
    """``scaled_dot_product_attention`` with the causal/mask/padding/ALiBi combined into
    one ``attn_mask`` (lower-right causal alignment)."""
    if softcap is not None:
        raise UnsupportedImpl("impl='sdpa' has no tanh soft-capping; use impl='tiled'")
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    slopes = resolve_alibi(alibi, Hq, q.device, compute_dtype(q.dtype))
    gqa = k.shape[1] != Hq
    masker = make_masker(q, k, causal, mask, key_padding_mask)
    if slopes is None and mask is None and key_padding_mask is None and (not causal or Nq == Nk):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale, enable_gqa=gqa)
    allowed = masker.full()
    attn_mask = allowed
    if slopes is not None:
        bias = alibi_bias(slopes, 0, Nq, 0, Nk, Nk - Nq).to(q.dtype)
        attn_mask = bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale, enable_gqa=gqa)
    if allowed is not None:
        empty = ~allowed.any(dim=-1, keepdim=True)
        if bool(empty.any()):  # SDPA's float-bias path gives NaN for rows with nothing visible
            out = out.masked_fill(empty, 0.0)
    return out


# ----------------------------------------------------------------------------- tiled


#: Default score tile of the tiled path, in elements over all (batch, head) pairs: 2 MiB
#: of float32, small enough to stay in the L2 cache while the tile's five elementwise
#: passes run (measured: 256x256 tiles at B*H = 8 are ~1.8x faster than 1024x512).
TILE_ELEMENTS = 1 << 19


def _tile_sizes(batch, heads, q_len, kv_len, block_q, block_k):
    bk = int(block_k) if block_k else min(kv_len, 256)
    bq = int(block_q) if block_q else max(64, min(1024, TILE_ELEMENTS // max(1, batch * heads * bk)))
    return max(1, min(bq, q_len)), max(1, bk)


class _TiledSoftmax(torch.autograd.Function):
    """FlashAttention forward (online softmax) and backward (recompute P from the saved
    log-sum-exp) over blocks. Works in the grouped layout ``(B, Hkv, G, N, D)`` so GQA
    needs no copy of K and V."""

    @staticmethod
    def forward(ctx, q, k, v, scale, masker, softcap, slopes, bq, bk):
        B, Hq, Nq, D = q.shape
        Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
        G = Hq // Hkv
        ct = compute_dtype(q.dtype)
        qg = q.view(B, Hkv, G, Nq, D)
        kg, vg = k.unsqueeze(2), v.unsqueeze(2)
        out = torch.zeros(B, Hkv, G, Nq, Dv, dtype=ct, device=q.device)
        lse = torch.full((B, Hkv, G, Nq), float("-inf"), dtype=ct, device=q.device)
        for qs in range(0, Nq, bq):
            qe = min(Nq, qs + bq)
            qb = qg[:, :, :, qs:qe].to(ct) * scale
            m = torch.full((B, Hkv, G, qe - qs, 1), float("-inf"), dtype=ct, device=q.device)
            l = torch.zeros_like(m)
            acc = torch.zeros(B, Hkv, G, qe - qs, Dv, dtype=ct, device=q.device)
            for ks in range(0, masker.key_end(qs, qe), bk):
                ke = min(Nk, ks + bk)
                s = _block_scores(qb, kg, ks, ke, ct, masker, softcap, slopes, qs, qe, Hkv, G)
                m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
                m_safe = m_new.masked_fill(torch.isinf(m_new), 0.0)
                p = s.sub_(m_safe).exp_()  # in place: the tile is reused, not reallocated
                corr = torch.exp(m - m_safe)
                l.mul_(corr).add_(p.sum(dim=-1, keepdim=True))
                acc.mul_(corr).add_(p @ vg[:, :, :, ks:ke].to(ct))
                m = m_new
            out[:, :, :, qs:qe] = acc / l.clamp(min=torch.finfo(ct).tiny)
            lse[:, :, :, qs:qe] = (m + torch.log(l)).squeeze(-1)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (scale, masker, softcap, slopes, bq, bk)
        return out.view(B, Hq, Nq, Dv).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        scale, masker, softcap, slopes, bq, bk = ctx.args
        B, Hq, Nq, D = q.shape
        Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
        G = Hq // Hkv
        ct = compute_dtype(q.dtype)
        qg, kg, vg = q.view(B, Hkv, G, Nq, D), k.unsqueeze(2), v.unsqueeze(2)
        dog = dout.reshape(B, Hkv, G, Nq, Dv).to(ct)
        delta = (dog * out).sum(dim=-1, keepdim=True)  # rowsum(dO * O)
        lse_safe = lse.masked_fill(torch.isinf(lse), float("inf")).unsqueeze(-1)  # empty rows -> P = 0
        dq = torch.zeros(B, Hkv, G, Nq, D, dtype=ct, device=q.device)
        dk = torch.zeros(B, Hkv, Nk, D, dtype=ct, device=q.device)
        dv = torch.zeros(B, Hkv, Nk, Dv, dtype=ct, device=q.device)
        for qs in range(0, Nq, bq):
            qe = min(Nq, qs + bq)
            n = qe - qs
            qb = qg[:, :, :, qs:qe].to(ct) * scale
            dob = dog[:, :, :, qs:qe]
            for ks in range(0, masker.key_end(qs, qe), bk):
                ke = min(Nk, ks + bk)
                raw = qb @ kg[:, :, :, ks:ke].to(ct).transpose(-1, -2)
                capped = softcap * torch.tanh(raw / softcap) if softcap is not None else raw
                # d/dx c*tanh(x/c) = 1 - tanh²; taken now, because the exp below works in
                # place on s, which may be the very tensor `capped` (no ALiBi, no mask)
                dcap = 1 - (capped / softcap) ** 2 if softcap is not None else None
                s = _finish_scores(capped, masker, slopes, qs, qe, ks, ke, Hkv, G)
                p = s.sub_(lse_safe[:, :, :, qs:qe]).exp_()
                vb = vg[:, :, :, ks:ke].to(ct)
                dv[:, :, ks:ke] += p.reshape(B, Hkv, G * n, ke - ks).transpose(-1, -2) @ dob.reshape(B, Hkv, G * n, Dv)
                ds = (dob @ vb.transpose(-1, -2)).sub_(delta[:, :, :, qs:qe]).mul_(p)  # P * (dP - delta)
                if dcap is not None:
                    ds.mul_(dcap)
                dq[:, :, :, qs:qe] += ds @ kg[:, :, :, ks:ke].to(ct)
                dk[:, :, ks:ke] += ds.reshape(B, Hkv, G * n, ke - ks).transpose(-1, -2) @ qb.reshape(B, Hkv, G * n, D)
        dq = (dq * scale).view(B, Hq, Nq, D).to(q.dtype)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def _block_scores(qb, kg, ks, ke, ct, masker: Masker, softcap, slopes, qs, qe, Hkv, G):
    s = qb @ kg[:, :, :, ks:ke].to(ct).transpose(-1, -2)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    return _finish_scores(s, masker, slopes, qs, qe, ks, ke, Hkv, G)


def _finish_scores(s, masker: Masker, slopes, qs, qe, ks, ke, Hkv, G):
    """ALiBi and the mask on a grouped score block ``(B, Hkv, G, n, m)``."""
    if slopes is not None:
        s = s + alibi_bias(slopes, qs, qe, ks, ke, masker.offset).view(1, Hkv, G, qe - qs, ke - ks)
    allowed = masker.block(qs, qe, ks, ke)
    if allowed is not None:
        s = s.masked_fill(~group_mask(allowed, Hkv, G), float("-inf"))
    return s


def _tiled_supports(call):
    if call.dropout_p > 0:
        return "the tiled path has no dropout; use impl='sdpa' (or 'reference')"
    if isinstance(call.options.get("alibi"), torch.Tensor) and call.options["alibi"].requires_grad:
        return "the tiled path has no gradient for learnable ALiBi slopes; use impl='sdpa' or 'reference'"
    return None


def check_softcap(softcap) -> None:
    if softcap is not None and not (float(softcap) > 0):
        raise AttentionInputError(f"softcap must be a positive number (or None), got {softcap!r}")


def tiled_attention(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
                    return_weights=False, alibi=False, softcap=None, block_q: Optional[int] = None,
                    block_k: Optional[int] = None):
    """FlashAttention's blocked online softmax in PyTorch; O(N · block) memory, autograd works.

    ``block_q`` / ``block_k``: tile sizes (default: key blocks of 256 and as many query
    rows as keep one score tile at :data:`TILE_ELEMENTS`).
    """
    if dropout_p > 0:
        raise UnsupportedImpl("impl='tiled' has no dropout; use impl='sdpa' or 'reference'")
    if isinstance(alibi, torch.Tensor) and alibi.requires_grad:
        raise UnsupportedImpl("impl='tiled' has no gradient for learnable ALiBi slopes; use impl='sdpa' or 'reference'")
    check_softcap(softcap)
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    masker = make_masker(q, k, causal, mask, key_padding_mask)
    slopes = resolve_alibi(alibi, Hq, q.device, compute_dtype(q.dtype))
    bq, bk = _tile_sizes(B, Hq, Nq, Nk, block_q, block_k)
    return _TiledSoftmax.apply(q.contiguous(), k.contiguous(), v.contiguous(), scale, masker, softcap, slopes, bq, bk)


# ------------------------------------------------------------------------------ flex

_FLEX = {}


def _flex_supports(call):
    if not flex_available():
        return "FlexAttention is not available in this PyTorch build"
    if call.device.type == "cpu" and call.requires_grad:
        return "FlexAttention on CPU runs for inference only (inputs require grad); use impl='tiled' or 'sdpa'"
    if call.dropout_p > 0:
        return "the flex path has no dropout"
    if call.device.type == "cpu" and call.dtype == torch.float64:
        return "FlexAttention on CPU supports float32/float16/bfloat16 only, not float64"
    if call.head_dim != call.v_dim:
        return "the flex path needs Dv == D"
    return None


def flex_attention_impl(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
                        return_weights=False, alibi=False, softcap=None):
    """FlexAttention with a block mask built from the same mask functions (compiled once)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    offset = Nk - Nq
    masker = make_masker(q, k, causal, mask, key_padding_mask)
    block_mask = None
    if not masker.trivial:
        user = None if mask is None else (mask if callable(mask) else tensor_mask(mask))
        kpm = key_padding_mask

        def mask_mod(b, h, qi, ki):
            ok = (ki <= qi + offset) if causal else (ki >= 0)
            if user is not None:
                ok = ok & user(b, h, qi, ki)
            if kpm is not None:
                ok = ok & kpm[b, ki]
            return ok

        block_mask = create_block_mask(mask_mod, B, Hq, Nq, Nk, device=q.device)
    slopes = resolve_alibi(alibi, Hq, q.device)

    def score_mod(score, b, h, qi, ki):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if slopes is not None:
            score = score - slopes[h] * (qi + offset - ki).abs()
        return score

    use_mod = softcap is not None or slopes is not None
    out = _FLEX["fn"](q, k, v, score_mod=score_mod if use_mod else None, block_mask=block_mask, scale=scale,
                      enable_gqa=k.shape[1] != Hq)
    if not masker.trivial:  # rows with nothing visible: flex leaves 0 (its lse is -inf); keep the contract explicit
        out = torch.nan_to_num(out, nan=0.0)
    return out


def flex_with_pattern(q, k, v, pattern, *, causal, mask, key_padding_mask, scale):
    """FlexAttention restricted to a method's own pattern (a mask_mod) and the user's mask:
    the inference path of the pattern-defined (local, sparse) methods."""
    if mask is not None:
        pattern = and_masks(pattern, mask if callable(mask) else tensor_mask(mask))
    return flex_attention_impl(q, k, v, causal=causal, mask=pattern, key_padding_mask=key_padding_mask, scale=scale)


# -------------------------------------------------------------------------- decoding


def init_state(batch_size, kv_heads, head_dim, v_dim, *, dtype=torch.float32, device=None, max_len=None,
               alibi=False, softcap=None):
    """A :class:`~attnzoo.decoding.KVCache` (preallocated to ``max_len`` if given)."""
    return KVCache(batch_size, kv_heads, head_dim, v_dim, dtype=dtype, device=device, capacity=max_len)


def step(cache: KVCache, q, k, v, *, scale, impl="auto", alibi=False, softcap=None, num_splits: Optional[int] = None):
    """Append the new keys/values and attend the new queries over the whole cache.

    ``impl``: ``"split_k"`` (default for long caches: exact split-K decoding,
    LeanAttention / flash-decoding) or ``"kv"`` (one SDPA / reference call over the cache).
    """
    cache.append(k, v)
    keys, values = cache.keys, cache.values
    T, L = q.shape[2], cache.length
    Hq = q.shape[1]
    if impl == "auto":
        impl = "split_k" if L >= 1024 and T == 1 else "kv"
    if impl == "kv":
        if softcap is not None or alibi:
            return reference(q, keys, values, causal=T > 1, scale=scale, alibi=alibi, softcap=softcap)
        return sdpa_attention(q, keys, values, causal=T > 1, scale=scale)
    if impl != "split_k":
        raise UnsupportedImpl(f"softmax decoding impl must be 'auto', 'kv' or 'split_k', got {impl!r}")
    slopes = resolve_alibi(alibi, Hq, q.device, compute_dtype(q.dtype))
    offset = L - T

    def score_fn(s, key_idx):  # s: (B, Hkv, G, splits, T, C); key_idx: (splits, 1, C)
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        if slopes is not None:
            pos = torch.arange(T, device=q.device).view(1, T, 1) + offset
            dist = (pos - key_idx).abs().to(s.dtype)
            s = s - slopes.view(1, k.shape[1], -1, 1, 1, 1) * dist
        return s

    def allowed_fn(key_idx):
        return key_idx <= torch.arange(T, device=q.device).view(1, T, 1) + offset

    return split_k_attention(q, keys, values, scale=scale, num_splits=num_splits, score_fn=score_fn,
                             allowed_fn=allowed_fn if T > 1 else None)


register(
    MethodSpec(
        name="softmax",
        family="softmax",
        summary="exact scaled dot-product attention (SDPA, FlashAttention-style tiled, FlexAttention)",
        paper="Attention Is All You Need",
        reference=reference,
        impls=[
            Impl("sdpa", sdpa_attention, supports=_sdpa_supports, description="torch scaled_dot_product_attention",
                 fudge=SDPA_FUDGE),
            Impl("tiled", tiled_attention, supports=_tiled_supports, mask_mod=True,
                 description="FlashAttention online softmax in blocks, O(N·block) memory, custom backward"),
            Impl("flex", flex_attention_impl, supports=_flex_supports, mask_mod=True,
                 description="compiled FlexAttention (CPU: inference only)"),
        ],
        exact=True,
        time="O(N^2 D)",
        memory="O(N·block) tiled, O(N^2) reference",
        dropout=True,
        decoding=True,
        step_impls=("kv", "split_k"),
        state_size="KV cache: 2·Hkv·N·D per sequence",
        init_state=init_state,
        step=step,
    )
)

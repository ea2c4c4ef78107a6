"""Head mixtures: layers that mix, route or share the heads of *any* registered method.

* :class:`MoHAttention` — Mixture-of-Head attention ("MoH: Multi-Head Attention as
  Mixture-of-Head Attention"): shared heads always on, a per-token router picks the
  top-k of the routed heads, and the heads' outputs are summed with the router's
  two-stage weights; it computes only the heads some token chose.
* :class:`SoftMixtureOfAttention` — the soft mixture of attention experts with shared
  keys and values of "BAM! Just Like That: Simple and Efficient Parameter Upcycling for
  Mixture of Experts": every expert has its own query and output projections, all share
  K and V, and a per-token softmax router mixes them; upcycled from dense layers by
  :meth:`SoftMixtureOfAttention.from_attentions`.
* :class:`EchoStack` and :class:`SharedWeightsAttention` — EchoAtt's cross-layer
  attention sharing ("EchoAtt: Attend, Copy, then Adjust for More Efficient Large
  Language Models"): a stack in which layer ``j`` reuses the attention weights computed
  by layer ``i`` and keeps only its own value and output projections;
  :func:`attention_similarity` measures how alike the layers' maps are (how EchoAtt
  picks the layers to share).

The attention maths stays in the methods (``attnzoo/methods``); the routing arithmetic
is :mod:`attnzoo.kernels.heads`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import stats
from ..errors import AttentionInputError, fmt_shape
from ..kernels.common import compute_dtype, repeat_kv
from ..kernels.heads import add_auxiliary_loss, balance_loss, two_stage_gates
from .attention import Attention

__all__ = ["MoHAttention", "SoftMixtureOfAttention", "SharedWeightsAttention", "EchoStack", "attention_similarity"]


def _positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AttentionInputError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _remap_heads(m, index: torch.Tensor, heads: int):
    """A mask (bool or float tensor broadcastable to ``(B, heads, Nq, Nk)``, or a mask_mod)
    for a call whose head ``j`` is the layer's head ``index[j]``: tensors are indexed on
    their head axis, a mask_mod is evaluated at the original head index."""
    if m is None:
        return None
    if isinstance(m, torch.Tensor):
        t = m
        while t.dim() < 4:
            t = t.unsqueeze(0)
        if t.dim() == 4 and t.shape[1] == heads and heads > 1:
            return t.index_select(1, index.to(t.device))
        return m
    if callable(m):
        table = index

        def remapped(b, h, q_idx, kv_idx):
            return m(b, table.to(h.device)[h] if isinstance(h, torch.Tensor) else int(table[int(h)]), q_idx, kv_idx)

        return remapped
    return m


def _rows(linear: nn.Linear, heads: torch.Tensor, width: int):
    """The weight and bias rows of ``linear`` that produce the given heads' ``width`` channels."""
    out, inp = linear.weight.shape
    w = linear.weight.view(out // width, width, inp).index_select(0, heads).reshape(-1, inp)
    b = None if linear.bias is None else linear.bias.view(-1, width).index_select(0, heads).reshape(-1)
    return w, b


# ------------------------------------------------------------------------------ MoH


class MoHAttention(nn.Module):
    """Mixture-of-Head attention over any registered method.

    Multi-head attention is a sum over heads, ``MHA(x) = Σ_i H^i W_O^i``; MoH treats the
    heads as experts and sums only the chosen ones, weighted::

        MoH(x_t) = Σ_i g_i(x_t) H^i(x_t) W_O^i

    Heads ``0 .. h_s−1`` are *shared* (always on); each token's router picks the top-k of
    the ``h_r = h − h_s`` *routed* heads; the weights are MoH's two-stage routing scores
    (:func:`attnzoo.kernels.heads.two_stage_gates`): ``[α1, α2] = softmax(W_h x)``,
    ``g_i = α1 softmax(W_s x)_i`` for a shared head, ``α2 softmax(W_r x)_i`` for a chosen
    routed one, 0 for the others. A token uses ``(h_s + k) / h`` of the heads.

    Args:
        dim, heads, kv_heads, dim_head, **attention_options: as :class:`Attention` (method,
            causal, rotary, ...), for a new layer; or ``attention=``: an existing
            :class:`Attention` whose projections MoH routes (MoH's continue-tuning of a
            pre-trained multi-head attention): :meth:`from_attention`.
        shared_heads: h_s (default 0). ``top_k``: routed heads per token (default half of
            the routed heads, at least one).
        weighting: ``"router"`` (the paper's weights) or ``"ones"`` (the chosen heads summed
            with weight 1: plain multi-head attention restricted to the chosen heads; the
            router then gets no gradient).
        skip: ``"auto"`` (default), ``"heads"`` or ``"none"`` — see *What is saved*.
        balance_weight: β of MoH's load-balance loss ``L_b = Σ_i f_i P_i`` (0.01 in the
            paper): in training mode ``β L_b`` is attached to the output
            (:func:`~attnzoo.kernels.heads.add_auxiliary_loss`), so ``loss.backward()``
            includes it with no change to the training loop; 0 turns it off.
            ``self.balance_loss`` holds ``L_b`` after each forward.

    After each forward, ``self.heads_used`` is the fraction of (token, head) pairs the
    router switched on and ``self.heads_computed`` the fraction of heads that were
    computed; both are also reported to :func:`attnzoo.stats.collect` as
    ``"heads_used"`` and ``"heads_computed"``.

    What is saved (``skip``): the router is per token, so a head is needed for a query
    row only if that token chose it, but its keys and values are needed for every key.
    MoH computes a head only if *some* token of the batch chose it: for a routed head no
    token chose, it skips the head's query projection, its attention (the method's
    whole cost for that head), its rows of the output projection, and the key/value
    projections of a key/value head none of whose query heads is computed. In decoding
    one token (``B = 1``) that leaves exactly ``h_s + k`` heads; in training on a batch
    of many tokens nearly every head is chosen by someone, and nothing is skipped (the
    gain of MoH there is the quality at a given head budget, not speed). Per-row
    skipping (each head only for the rows that chose it) would change the positions a
    method sees and is not done. The skipped heads are run as the method's only heads,
    which is right only for methods whose heads are independent and alike (no per-head
    parameters, spans, slopes or decays): ``"auto"`` checks this once per pattern by
    running the method on identical heads (and on one head alone) and computes every
    head for a method that fails the check or has parameters; ``"heads"`` raises for
    such a method; ``"none"`` always computes every head. Dense masks and mask_mods are
    re-indexed to the computed heads. [J] The check is an experiment on one small input,
    not a proof.

    Decoding (:meth:`init_cache`, :meth:`step`) computes every head — the method's state
    must take every head's keys at every step — and weights them as the forward does.
    """

    def __init__(self, dim: Optional[int] = None, heads: int = 8, kv_heads: Optional[int] = None,
                 dim_head: Optional[int] = None, *, shared_heads: int = 0, top_k: Optional[int] = None,
                 weighting: str = "router", skip: str = "auto", balance_weight: float = 0.01,
                 attention: Optional[Attention] = None, **attention_options):
        super().__init__()
        if attention is None:
            if dim is None:
                raise AttentionInputError("MoHAttention needs dim (a new layer) or attention= (an Attention to route)")
            attention = Attention(dim, heads, kv_heads, dim_head, **attention_options)
        elif not isinstance(attention, Attention):
            raise AttentionInputError(f"attention must be an attnzoo Attention layer, got {type(attention).__name__}")
        elif dim is not None or kv_heads is not None or dim_head is not None or attention_options:
            raise AttentionInputError("give an Attention (attention=) or the arguments of a new one, not both")
        if attention.spec.query != "tokens":
            raise AttentionInputError(f"MoH routes each query token; method {attention.method!r} has learned queries")
        self.attention = attention
        H = attention.heads
        if isinstance(shared_heads, bool) or not isinstance(shared_heads, int) or not 0 <= shared_heads <= H:
            raise AttentionInputError(f"shared_heads must be an int in [0, heads={H}], got {shared_heads!r}")
        routed = H - shared_heads
        if top_k is None:
            top_k = max(1, routed // 2) if routed else 0
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= routed:
            raise AttentionInputError(f"top_k must be an int in [0, routed heads={routed}], got {top_k!r}")
        if shared_heads + top_k == 0:
            raise AttentionInputError("MoH with no shared heads and top_k=0 uses no head")
        if weighting not in ("router", "ones"):
            raise AttentionInputError(f"weighting must be 'router' or 'ones', got {weighting!r}")
        if skip not in ("auto", "heads", "none"):
            raise AttentionInputError(f"skip must be 'auto', 'heads' or 'none', got {skip!r}")
        if not float(balance_weight) >= 0:
            raise AttentionInputError(f"balance_weight must be >= 0, got {balance_weight!r}")
        self.shared_heads, self.routed_heads, self.top_k = shared_heads, routed, top_k
        self.weighting, self.skip, self.balance_weight = weighting, skip, float(balance_weight)
        d = attention.dim
        self.router_shared = nn.Linear(d, shared_heads, bias=False) if shared_heads else None  # W_s
        self.router_routed = nn.Linear(d, routed, bias=False) if routed else None  # W_r
        self.router_mix = nn.Linear(d, 2, bias=False) if shared_heads and routed else None  # W_h
        self.heads_used: Optional[float] = None
        self.heads_computed: Optional[float] = None
        self.balance_loss: Optional[torch.Tensor] = None
        self._uniform: dict = {}

    @classmethod
    def from_attention(cls, attention: Attention, **moh_options) -> "MoHAttention":
        """MoH over an existing :class:`Attention` (its projections, method and options kept;
        the router is new): MoH's continue-tuning of a pre-trained multi-head attention."""
        return cls(attention=attention, **moh_options)

    @property
    def heads(self) -> int:
        return self.attention.heads

    # ------------------------------------------------------------------ routing
    def route(self, x: torch.Tensor):
        """``(gates (B, N, H), active (B, N, H) bool, chosen (B, N, h_r) | None, probs | None)``."""
        s = self.router_shared(x) if self.router_shared is not None else None
        r = self.router_routed(x) if self.router_routed is not None else None
        m = self.router_mix(x) if self.router_mix is not None else None
        gates, chosen, probs = two_stage_gates(s, r, m, self.top_k)
        on = [torch.ones(*x.shape[:-1], self.shared_heads, dtype=torch.bool, device=x.device)]
        if chosen is not None:
            on.append(chosen)
        active = torch.cat(on, dim=-1)
        if self.weighting == "ones":
            gates = active.to(gates.dtype)
        return gates, active, chosen, probs

    def _skippable(self, cross: bool) -> bool:
        """Whether the method may run on a subset of the heads (see the class docstring)."""
        if self.skip == "none":
            return False
        ok = self._uniform.get(cross)
        if ok is None:
            ok = self._uniform[cross] = self._probe(cross)
        if not ok and self.skip == "heads":
            a = self.attention
            raise AttentionInputError(
                f"skip='heads': method {a.method!r} cannot run on a subset of the heads (it has per-head parameters or "
                "its heads are not alike: per-head spans, slopes or decays); use skip='auto' or 'none'")
        return ok

    def _probe(self, cross: bool) -> bool:
        a = self.attention
        if a.spec.module is not None:
            return False
        H, Hkv, dh = a.heads, a.kv_heads, a.dim_head
        dev = a.to_q.weight.device
        g = torch.Generator().manual_seed(0)
        n, m = 16, (12 if cross else 16)
        for dtype in (torch.float64, torch.float32):
            q1, k1, v1 = (torch.randn(1, 1, L, dh, generator=g, dtype=dtype).to(dev) for L in (n, m, m))
            try:
                with torch.no_grad():
                    many = a.attn(q1.expand(1, H, n, dh).contiguous(), k1.expand(1, Hkv, m, dh).contiguous(),
                                  v1.expand(1, Hkv, m, dh).contiguous(), causal=a.causal, cross=cross)
                    one = a.attn(q1, k1, v1, causal=a.causal, cross=cross)
            except Exception:  # the method cannot run this probe (a grid, a length): no skipping
                continue
            tol = (1e-9 if dtype == torch.float64 else 1e-4) * max(1.0, float(many.abs().max()))
            return bool((many - many[:, :1]).abs().max() <= tol and (many[:, :1] - one).abs().max() <= tol)
        return False

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, *, attn_mask=None, mask=None,
                key_padding_mask: Optional[torch.Tensor] = None, key_mask: Optional[torch.Tensor] = None,
                return_weights: bool = False):
        """x: (B, N, dim); context: (B, M, context_dim) for cross-attention; masks as
        :meth:`Attention.forward`. Returns (B, N, dim), or ``(y, weights (B, H, N, M))``
        with ``return_weights`` (each head's own weights, zeros for a head not computed)."""
        a = self.attention
        a._check_x(x)
        cross = context is not None
        if cross:
            a._check_x(context, "context", a.to_k.in_features)
        gates, active, chosen, probs = self.route(x)
        H = a.heads
        union = active.reshape(-1, H).any(dim=0)
        heads = None
        if not bool(union.all()) and self._skippable(cross):
            heads = union.nonzero().flatten()
        self.heads_used = float(active.float().mean())
        self.heads_computed = 1.0 if heads is None else heads.numel() / H
        if stats.active():
            stats.report("heads_used", self.heads_used)
            stats.report("heads_computed", self.heads_computed)
        masks = dict(attn_mask=attn_mask, mask=mask, key_padding_mask=key_padding_mask, key_mask=key_mask)
        src = context if cross else x
        positions = None if cross else torch.arange(x.shape[1], device=x.device)
        dropout = a.dropout if a.training else 0.0
        if heads is None:
            q = a._queries(x, positions)
            k, v = a._keys_values(src, positions)
            g = gates
        else:
            q, k, v = self._subset_qkv(x, src, positions, heads)
            masks["attn_mask"] = _remap_heads(attn_mask, heads, H)
            masks["mask"] = _remap_heads(mask, heads, H)
            g = gates.index_select(-1, heads)
        res = a.attn(q, k, v, causal=a.causal, dropout_p=dropout, return_weights=return_weights, cross=cross,
                     **masks)
        out, weights = res if return_weights else (res, None)
        out = out * g.transpose(1, 2).unsqueeze(-1).to(out.dtype)
        y = self._output(x, out, heads)
        if probs is not None:
            self.balance_loss = balance_loss(chosen, probs)
            if self.training and self.balance_weight > 0:
                y = add_auxiliary_loss(y, self.balance_weight * self.balance_loss)
        else:
            self.balance_loss = None
        if return_weights:
            if heads is not None:
                full = weights.new_zeros(weights.shape[0], H, *weights.shape[2:])
                weights = full.index_copy(1, heads, weights)
            return y, weights
        return y

    def _subset_qkv(self, x, src, positions, heads):
        """q, k, v of the computed heads only (their rows of the projections). The method
        sees them as its only heads: per computed query head its key/value head, grouped
        when whole groups are computed, else one key/value head per query head."""
        a = self.attention
        H, Hkv, dh = a.heads, a.kv_heads, a.dim_head
        G = H // Hkv
        B, N, _ = x.shape
        wq, bq = _rows(a.to_q, heads, dh)
        q = F.linear(x, wq, bq).view(B, N, -1, dh).transpose(1, 2)
        if a.q_norm is not None:
            q = a.q_norm(q)
        if a.rotary is not None and positions is not None:
            q = a.rotary(q, positions)
        groups = torch.unique(heads // G)  # sorted
        M = src.shape[1]
        wk, bk = _rows(a.to_k, groups, dh)
        wv, bv = _rows(a.to_v, groups, dh)
        k = F.linear(src, wk, bk).view(B, M, -1, dh).transpose(1, 2)
        v = F.linear(src, wv, bv).view(B, M, -1, dh).transpose(1, 2)
        if a.k_norm is not None:
            k = a.k_norm(k)
        if a.rotary is not None and positions is not None:
            k = a.rotary(k, positions)
        if heads.numel() != groups.numel() * G:  # some group is partly computed: one k/v head per query head
            slot = torch.searchsorted(groups, heads // G)
            k, v = k.index_select(1, slot), v.index_select(1, slot)
        return q, k, v

    def _output(self, x, out, heads):
        """``Σ_i (g_i H^i) W_O^i`` over the computed heads (their columns of W_O), after the
        layer's sigmoid output gate if it has one."""
        a = self.attention
        if heads is None:
            return a._output(x, out)
        if a.gate is not None:
            wg = a.gate.weight.index_select(0, heads)
            bg = None if a.gate.bias is None else a.gate.bias.index_select(0, heads)
            out = out * torch.sigmoid(F.linear(x, wg, bg)).transpose(1, 2).unsqueeze(-1)
        B, h, N, dh = out.shape
        cols = (heads[:, None] * dh + torch.arange(dh, device=heads.device)).flatten()
        return F.linear(out.transpose(1, 2).reshape(B, N, h * dh), a.to_out.weight.index_select(1, cols),
                        a.to_out.bias)

    # ----------------------------------------------------------------- decoding
    def init_cache(self, batch_size: int, max_len: Optional[int] = None, **kwargs):
        """As :meth:`Attention.init_cache`."""
        return self.attention.init_cache(batch_size, max_len, **kwargs)

    def step(self, x: torch.Tensor, cache) -> torch.Tensor:
        """Decode ``x (B, T, dim)`` like :meth:`Attention.step`, every head computed and the
        heads weighted by the router as in the forward pass."""
        a = self.attention
        a._check_x(x)
        if x.shape[0] != cache.batch_size:
            raise AttentionInputError(f"x has batch {x.shape[0]} but the cache was made for batch {cache.batch_size}")
        gates, active, _, _ = self.route(x)
        self.heads_used, self.heads_computed = float(active.float().mean()), 1.0
        T = x.shape[1]
        if cache.context_k is not None:
            q = a._queries(x, None)
            out = a.attn(q, cache.context_k, cache.context_v, causal=False, key_mask=cache.context_key_mask,
                         cross=True)
        else:
            positions = torch.arange(cache.position, cache.position + T, device=x.device)
            q = a._queries(x, positions)
            k, v = a._keys_values(x, positions)
            out = a.attn.step(cache.state, q, k, v)
            cache.position += T
        out = out * gates.transpose(1, 2).unsqueeze(-1).to(out.dtype)
        return a._output(x, out)

    def extra_repr(self) -> str:
        return (f"shared_heads={self.shared_heads}, routed_heads={self.routed_heads}, top_k={self.top_k}, "
                f"weighting={self.weighting!r}, skip={self.skip!r}")


# ----------------------------------------------------------------------------- BAM


class SoftMixtureOfAttention(nn.Module):
    """BAM's soft mixture of attention experts with shared keys and values.

    ``E`` attention experts, each with its own query and output projections (``heads``
    query heads of width ``dim_head`` each) over *one* set of key and value projections
    (``kv_heads`` heads), mixed per token by a softmax router::

        y_t = Σ_e p_e(x_t) · W_O^e Attn(x_t W_Q^e, K, V),      p(x_t) = softmax(W_r x_t)

    "BAM! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of
    Experts" (Zhang et al., 2024) upcycles the attention of several dense models into
    such a "soft-variant of Mixture of Attention": soft routing (every expert active,
    weighted) and key/value parameters shared across the experts. Sharing K/V is what
    makes it cheap: K and V are projected once, and the ``E · heads`` expert query heads
    attend them in one grouped-query call of the method (the expert heads of one
    key/value head are one GQA group), so the cost is that of one attention layer with
    ``E`` times the query heads. The output projection takes the concatenation of the
    router-scaled expert heads (``Σ_e p_e o_e W_O^e`` as one matrix product).

    Args:
        dim, heads, kv_heads, dim_head: per expert, as :class:`Attention`.
        experts: E. ``**attention_options``: as :class:`Attention` (method, causal,
            rotary, qk_norm, gate, bias, ...): the inner layer is an :class:`Attention`
            with ``E · heads`` query heads and ``kv_heads`` key/value heads.

    ``self.router_probs`` holds the last forward's ``p (B, N, E)``. [J] The router has no
    bias and no noise; BAM's parallel attention/FFN block layout is the model's choice,
    not the layer's. With ``bias=True`` each expert keeps its own output bias.
    """

    def __init__(self, dim: int, heads: int = 8, kv_heads: Optional[int] = None, dim_head: Optional[int] = None, *,
                 experts: int = 2, bias: bool = False, **attention_options):
        super().__init__()
        _positive_int("experts", experts)
        _positive_int("heads", heads)
        kv_heads = kv_heads or heads
        if heads % kv_heads:
            raise AttentionInputError(f"heads must be a multiple of kv_heads, got heads={heads}, kv_heads={kv_heads}")
        if dim_head is None:
            if dim % heads:
                raise AttentionInputError(f"dim={dim} is not divisible by heads={heads}; pass dim_head=")
            dim_head = dim // heads
        self.experts, self.expert_heads, self.kv_heads, self.dim_head = experts, heads, kv_heads, dim_head
        self.attention = Attention(dim, experts * heads, kv_heads, dim_head, bias=bias, **attention_options)
        if bias:  # one output bias per expert, mixed by the router like the experts
            self.attention.to_out = nn.Linear(experts * heads * dim_head, dim, bias=False)
            self.out_bias = nn.Parameter(torch.zeros(experts, dim))
        else:
            self.out_bias = None
        self.router = nn.Linear(dim, experts, bias=False)
        G = heads // kv_heads
        # combined query head j = g·E·G + e·G + i  <->  expert e, expert head h = g·G + i
        j = torch.arange(experts * heads)
        g, rest = j // (experts * G), j % (experts * G)
        self.register_buffer("expert_of", rest // G, persistent=False)
        self.register_buffer("head_of", g * G + rest % G, persistent=False)
        self.router_probs: Optional[torch.Tensor] = None

    def index(self, expert: int, head: int) -> int:
        """The inner layer's query head that is head ``head`` of expert ``expert``."""
        G = self.expert_heads // self.kv_heads
        return (head // G) * self.experts * G + expert * G + head % G

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, *, attn_mask=None, mask=None,
                key_padding_mask: Optional[torch.Tensor] = None, key_mask: Optional[torch.Tensor] = None,
                return_weights: bool = False):
        """x: (B, N, dim); context: (B, M, context_dim). Masks as :meth:`Attention.forward`
        (a mask's head axis is the expert's ``heads``). Returns (B, N, dim), or
        ``(y, weights (B, E, heads, N, M))``."""
        a = self.attention
        a._check_x(x)
        cross = context is not None
        if cross:
            a._check_x(context, "context", a.to_k.in_features)
        logits = self.router(x)
        p = torch.softmax(logits.to(compute_dtype(logits.dtype)), dim=-1)  # (B, N, E), float32 for half inputs
        self.router_probs = p
        positions = None if cross else torch.arange(x.shape[1], device=x.device)
        q = a._queries(x, positions)
        k, v = a._keys_values(context if cross else x, positions)
        res = a.attn(q, k, v, causal=a.causal, attn_mask=_remap_heads(attn_mask, self.head_of, self.expert_heads),
                     mask=_remap_heads(mask, self.head_of, self.expert_heads), key_padding_mask=key_padding_mask,
                     key_mask=key_mask, dropout_p=a.dropout if a.training else 0.0, return_weights=return_weights,
                     cross=cross)
        out, weights = res if return_weights else (res, None)
        scale = p.index_select(-1, self.expert_of).transpose(1, 2).unsqueeze(-1)  # (B, E·H, N, 1)
        y = a._output(x, out * scale.to(out.dtype))
        if self.out_bias is not None:
            y = y + (p.to(y.dtype) @ self.out_bias.to(y.dtype))
        if return_weights:
            order = torch.tensor([[self.index(e, h) for h in range(self.expert_heads)] for e in range(self.experts)],
                                 device=weights.device)
            return y, weights[:, order]
        return y

    @classmethod
    def from_attentions(cls, attentions, router: Optional[torch.Tensor] = None) -> "SoftMixtureOfAttention":
        """BAM's upcycling: expert ``e``'s query and output projections (and gate) are those
        of ``attentions[e]`` (dense layers of the same shape and method, e.g. one per
        specialised seed model); the shared key and value projections are their mean [J]
        (BAM shares K/V across the experts; averaging is how the other non-expert
        parameters of an upcycled model are merged); QK-norm weights likewise. ``router``:
        an optional ``(E, dim)`` initial router weight. With one expert the result equals
        that expert exactly."""
        attentions = list(attentions)
        if not attentions or not all(isinstance(t, Attention) for t in attentions):
            raise AttentionInputError("from_attentions needs a non-empty list of attnzoo Attention layers")
        a0 = attentions[0]
        keys = ("dim", "heads", "kv_heads", "dim_head", "method", "causal")
        for t in attentions[1:]:
            for name in keys:
                if getattr(t, name) != getattr(a0, name):
                    raise AttentionInputError(f"the experts differ in {name}: {getattr(a0, name)!r} and "
                                              f"{getattr(t, name)!r}")
        if a0.spec.module is not None:
            raise AttentionInputError(
                f"method {a0.method!r} has per-head parameters sized to one expert; build SoftMixtureOfAttention "
                "directly and train it")
        moa = cls(a0.dim, a0.heads, a0.kv_heads, a0.dim_head, experts=len(attentions), bias=a0.to_q.bias is not None,
                  method=a0.method, causal=a0.causal, context_dim=a0.to_k.in_features, rotary=a0.rotary is not None,
                  qk_norm=a0.q_norm is not None, gate=a0.gate is not None,
                  dropout=a0.dropout, impl=a0.attn.impl, **a0.attn.options)
        moa = moa.to(device=a0.to_q.weight.device, dtype=a0.to_q.weight.dtype)  # copy without rounding
        inner, dh = moa.attention, a0.dim_head
        with torch.no_grad():
            for e, t in enumerate(attentions):
                for h in range(a0.heads):
                    j = moa.index(e, h)
                    inner.to_q.weight[j * dh:(j + 1) * dh] = t.to_q.weight[h * dh:(h + 1) * dh]
                    inner.to_out.weight[:, j * dh:(j + 1) * dh] = t.to_out.weight[:, h * dh:(h + 1) * dh]
                    if t.to_q.bias is not None:
                        inner.to_q.bias[j * dh:(j + 1) * dh] = t.to_q.bias[h * dh:(h + 1) * dh]
                    if t.gate is not None:
                        inner.gate.weight[j] = t.gate.weight[h]
                        inner.gate.bias[j] = t.gate.bias[h]
                if moa.out_bias is not None:
                    moa.out_bias[e] = t.to_out.bias
            for name in ("to_k", "to_v"):
                getattr(inner, name).weight.copy_(torch.stack([getattr(t, name).weight for t in attentions]).mean(0))
                if getattr(inner, name).bias is not None:
                    getattr(inner, name).bias.copy_(torch.stack([getattr(t, name).bias for t in attentions]).mean(0))
            for name in ("q_norm", "k_norm"):
                if getattr(inner, name) is not None:
                    getattr(inner, name).weight.copy_(
                        torch.stack([getattr(t, name).weight for t in attentions]).mean(0))
            if a0.rotary is not None:
                inner.rotary.inv_freq.copy_(a0.rotary.inv_freq)  # the experts' own frequencies, bit for bit
            if router is not None:
                moa.router.weight.copy_(router)
        return moa


# ------------------------------------------------------------------------- EchoAtt


class SharedWeightsAttention(nn.Module):
    """EchoAtt's copied attention: another layer's attention weights applied to this
    layer's own values, ``y = W_O (A · x W_V)``, with ``A (B, heads, N, M)`` given.

    The layer has no query or key projection (EchoAtt's parameter saving) and runs no
    attention method: ``A · V`` is one batched matrix product (O(N M) time, on top of the
    O(N M) weights the source layer had to materialise).

    Args:
        dim, heads, kv_heads, dim_head, context_dim, bias, gate: as :class:`Attention`.
    """

    def __init__(self, dim: int, heads: int = 8, kv_heads: Optional[int] = None, dim_head: Optional[int] = None, *,
                 context_dim: Optional[int] = None, bias: bool = False, gate: bool = False):
        super().__init__()
        kv_heads = kv_heads or heads
        if heads % kv_heads:
            raise AttentionInputError(f"heads must be a multiple of kv_heads, got heads={heads}, kv_heads={kv_heads}")
        dim_head = dim_head or dim // heads
        self.dim, self.heads, self.kv_heads, self.dim_head = dim, heads, kv_heads, dim_head
        self.to_v = nn.Linear(context_dim or dim, kv_heads * dim_head, bias=bias)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=bias)
        self.gate = nn.Linear(dim, heads, bias=True) if gate else None

    def forward(self, x: torch.Tensor, weights: torch.Tensor, context: Optional[torch.Tensor] = None):
        """x: (B, N, dim); weights: (B, heads, N, M) from the source layer; context:
        (B, M, context_dim) for cross-attention. Returns (B, N, dim)."""
        src = x if context is None else context
        B, N, _ = x.shape
        M = src.shape[1]
        if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (B, self.heads, N, M):
            raise AttentionInputError(
                f"weights must have shape (B, heads, N, M) = {(B, self.heads, N, M)}, got "
                f"{fmt_shape(weights) if isinstance(weights, torch.Tensor) else type(weights).__name__}")
        v = self.to_v(src).view(B, M, self.kv_heads, self.dim_head).transpose(1, 2)
        out = weights.to(v.dtype) @ repeat_kv(v, self.heads)  # (B, heads, N, dim_head)
        if self.gate is not None:
            out = out * torch.sigmoid(self.gate(x)).transpose(1, 2).unsqueeze(-1)
        return self.to_out(out.transpose(1, 2).reshape(B, N, self.heads * self.dim_head))


class _MLP(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, mult * dim), nn.GELU(), nn.Linear(mult * dim, dim))

    def forward(self, x):
        return self.net(x)


class _EchoBlock(nn.Module):
    def __init__(self, dim, attn, mlp_mult):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = attn
        self.mlp = _MLP(dim, mlp_mult)


class EchoStack(nn.Module):
    """A stack of pre-norm transformer blocks (attention, then MLP) in which some layers
    reuse the attention weights of an earlier one (EchoAtt).

    "EchoAtt: Attend, Copy, then Adjust for More Efficient Large Language Models"
    (Rajabzadeh et al., 2024) observes that inner layers of LLMs have very similar
    attention matrices, shares them ("copy": layer ``j`` takes the attention weights of
    layer ``i``), and fine-tunes the rest ("adjust", with knowledge distillation from
    the unshared model — the training recipe, not part of the layer). A sharing layer
    computes no scores: it has only its value and output projections
    (:class:`SharedWeightsAttention`), which saves its query and key projections and its
    whole score computation.

    Args:
        dim, depth, heads, kv_heads, dim_head: the stack's width, layers and heads.
        share: ``{j: i}`` — layer ``j`` reuses the weights of layer ``i < j`` (a chain
            ``{2: 1, 1: 0}`` resolves to layer 0's weights for both).
        mlp_mult: MLP width factor. ``**attention_options``: of the computing layers'
            :class:`Attention` (method, causal, rotary, ...).

    The source layers need their weights, so they run with ``return_weights=True``: only
    methods whose spec can return weights (``spec.weights``) can be shared, and the
    weights are a dense ``(B, heads, N, M)`` tensor — O(N²) memory, whatever the
    method's own memory. ``self.weights`` holds the last forward's weights of each
    source layer (``{i: (B, heads, N, M)}``).
    """

    def __init__(self, dim: int, depth: int, heads: int = 8, kv_heads: Optional[int] = None,
                 dim_head: Optional[int] = None, *, share: Optional[dict] = None, mlp_mult: int = 4,
                 **attention_options):
        super().__init__()
        _positive_int("depth", depth)
        share = dict(share or {})
        source = {}
        for j, i in share.items():
            if not (isinstance(j, int) and isinstance(i, int) and 0 <= i < j < depth):
                raise AttentionInputError(
                    f"share maps a layer j to an earlier layer i (0 <= i < j < depth={depth}), got {j!r}: {i!r}")
        for j in sorted(share):
            i = share[j]
            source[j] = source.get(i, i)  # a chain resolves to the layer that computes
        self.source = source
        self.anchors = sorted(set(source.values()))
        blocks = []
        for layer in range(depth):
            if layer in source:
                attn = SharedWeightsAttention(dim, heads, kv_heads, dim_head,
                                              context_dim=attention_options.get("context_dim"),
                                              bias=bool(attention_options.get("bias", False)),
                                              gate=bool(attention_options.get("gate", False)))
            else:
                attn = Attention(dim, heads, kv_heads, dim_head, **attention_options)
                if layer in self.anchors and not attn.spec.weights:
                    raise AttentionInputError(
                        f"layer {layer} shares its attention weights, but method {attn.method!r} cannot return them "
                        "(its spec has weights=False)")
            blocks.append(_EchoBlock(dim, attn, mlp_mult))
        self.blocks = nn.ModuleList(blocks)
        self.weights: dict = {}

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, **masks) -> torch.Tensor:
        """x: (B, N, dim) -> (B, N, dim); ``context`` and the masks go to every computing
        layer (the sharing layers take the weights, masks already applied)."""
        weights = {}
        for layer, blk in enumerate(self.blocks):
            h = blk.norm1(x)
            if layer in self.source:
                a = blk.attn(h, weights[self.source[layer]], context=context)
            elif layer in self.anchors:
                a, weights[layer] = blk.attn(h, context=context, return_weights=True, **masks)
            else:
                a = blk.attn(h, context=context, **masks)
            x = x + a
            x = x + blk.mlp(blk.norm2(x))
        self.weights = weights
        return x


def attention_similarity(weights) -> torch.Tensor:
    """How alike the attention maps of several layers are: ``S[a, b]`` = the mean over
    batch, heads and query rows of the cosine similarity between layer a's and layer b's
    rows of weights (each ``(B, H, N, M)``), ``(L, L)`` — the measure EchoAtt uses to find
    layers whose attention can be shared (high similarity between neighbours)."""
    ws = [w.float() for w in weights]
    if not ws or any(w.shape != ws[0].shape for w in ws):
        raise AttentionInputError("attention_similarity needs a list of weights of one shape (B, H, N, M)")
    rows = torch.stack([F.normalize(w, dim=-1) for w in ws])  # (L, B, H, N, M)
    return torch.einsum("abhnm,cbhnm->ac", rows, rows) / rows[0, ..., 0].numel()

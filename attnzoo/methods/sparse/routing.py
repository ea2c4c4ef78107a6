"""Routing attention: content-based sparse attention by online k-means clustering.

"Efficient Content-Based Sparse Attention with Routing Transformers" (Roy, Saffar,
Vaswani, Grangier; TACL 2021). Per query head ``h`` there are ``C`` unit centroids
``μ_h,c`` in a space shared by queries and keys. Queries and keys are L2-normalised,
``q̂ = q/|q|``, ``k̂ = k/|k|``, and routed to clusters by their affinity ``q̂·μ``:

    Q_c = the ceil(Nq/C) queries with the largest q̂·μ_c      (balanced top-k membership)
    K_c = the ceil(Nk/C) keys    with the largest k̂·μ_c
    query i attends key j  iff  ∃c: i ∈ Q_c and j ∈ K_c       (then causal / mask / padding)

and attention is plain softmax over that set (the union over the query's clusters).
Centroids are learnt by online k-means: in training mode the module moves each centroid
toward the mean of the normalised queries and keys assigned to it (nearest centroid),
``μ ← decay·μ + (1 - decay)·mean``, then renormalises.

Implementations:

* ``reference`` — the clusters formed one at a time, plainly: for each cluster the
  affinity of every token to its centroid and its ``ceil(N/C)`` members found by value
  (every token above the ``ceil(N/C)``-th largest affinity, then the tokens tied at it,
  earliest first); the explicit ``Nq × Nk`` union of the clusters' (query, key)
  products, then dense masked softmax.
* ``cluster`` — the memberships by a stable top-k per cluster (:func:`route`; ties to the earlier token), each
  cluster's member queries and keys gathered (static shapes ``ceil(N/C)``), dense
  softmax inside each (cluster queries × cluster keys) with the causal mask by original
  positions, and scattered back; a query in several clusters combines its per-cluster
  partial softmaxes exactly (shared per-query maximum, summed numerators and
  denominators), a key shared by two of its clusters counted once. Time
  O(N·(N/C)·D), memory O(N·N/C) — O(N^1.5) for C = √N as in the paper — never N×N.

The two compute the selection with different programs (shared only: the tie rule and
the rounding of the scores, :mod:`attnzoo.kernels.routing_select`), so the contract's
fast-vs-reference comparison checks the search itself.

Judgement calls:

* [J] Balanced top-k membership (each cluster takes exactly ``ceil(N/C)`` queries and
  ``ceil(N/C)`` keys, as in the paper's implementation) instead of argmax assignment, so
  shapes are static; a token may belong to several clusters or to none. A query in no
  cluster (or whose clusters hold no visible key) returns zeros.
* [J] Padded keys rank last in every cluster's key top-k, so they never take a real
  key's place. Padding still changes the result: cluster widths are ``ceil(N/C)`` of
  the padded lengths and padded query positions take query slots.
* [J] Membership ties are broken by position (the earlier token wins), in both programs.
  The affinities are computed in float64 from the detached inputs rounded to float32,
  then rounded to float32 (:mod:`attnzoo.kernels.routing_select`), under
  ``torch.no_grad()``: the selection is not differentiated (k-means is not trained by
  backpropagation in the paper either).
* [J] Union semantics: a query in several clusters attends the union of their keys,
  each key once (the fast path drops a key from a later cluster when an earlier cluster
  of the same query already holds it).
* [J] Centroids are per query head ``(Hq, C, D)``; with GQA the keys of a k/v head are
  routed by each of its query heads' centroids. ``centroids=None`` in the functional
  form uses a deterministic initialisation: ``torch.randn(Hq, C, D)`` from
  ``torch.Generator().manual_seed(0)``, unit-normalised (:func:`init_centroids`).
  ``num_clusters`` defaults to round(√max(Nq, Nk)) (the paper's O(N^1.5) regime), or to
  ``centroids.shape[1]`` when centroids are given; the module's default is 4 (it owns
  fixed centroids). Sized for short sequences (``for_length``): 4 clusters below 1024
  tokens (a query sees about a quarter of the keys), the default above.
* [J] The EMA update (module, training mode only, after the forward, never
  differentiated) assigns each normalised query and real (non-padded) key to its
  nearest centroid; a centroid with nothing assigned keeps its value.
* [J] Cross-attention and causal cross-attention are supported (queries and keys are
  clustered separately, causal masking is lower-right by original positions).
  Membership depends on all the tokens, so there is no token-by-token decoding and the
  spec has ``rows_independent=False``.
* [J] Density reported (``cluster``): attended keys (after causal, mask and padding)
  over the real keys visible under causality, averaged over queries; ``unrouted``: the
  fraction of queries in no cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ... import stats
from ...errors import AttentionInputError, fmt_shape
from ...kernels.blocksparse import mask_at
from ...kernels.common import compute_dtype, mean_density, real_visible_counts, repeat_kv
from ...kernels.block_select import stable_topk
from ...kernels.routing_select import routed_softmax, selection_input, selection_scores, top_by_threshold
from ...registry import MethodOptions, method


@dataclass(frozen=True)
class RoutingOptions(MethodOptions):
    """Options of ``routing``.

    Attributes:
        num_clusters: C (default round(√max(Nq, Nk)), or the centroids' count).
        centroids: ``(Hq, C, D)`` centroids (default :func:`init_centroids`, seed 0).
    """

    num_clusters: Optional[int] = None
    centroids: Optional[torch.Tensor] = None

    def validate(self) -> None:
        if self.num_clusters is not None and self.num_clusters < 1:
            raise AttentionInputError(f"num_clusters must be a positive int, got {self.num_clusters!r}")

    @classmethod
    def for_length(cls, n: int) -> dict:
        # 4 clusters: a query sees about a quarter of the keys; from 1024 tokens on, the
        # default √N clusters (the paper's regime)
        return {"num_clusters": 4} if n < 1024 else {}


# ------------------------------------------------------------------------ centroids


def init_centroids(heads: int, num_clusters: int, head_dim: int, seed: int = 0, dtype=torch.float32,
                   device=None) -> torch.Tensor:
    """The deterministic initial centroids ``(heads, num_clusters, head_dim)``: standard
    normal from ``torch.Generator().manual_seed(seed)`` (on the CPU), unit-normalised."""
    g = torch.Generator().manual_seed(int(seed))
    mu = torch.randn(heads, num_clusters, head_dim, generator=g, dtype=torch.float64)
    return F.normalize(mu, dim=-1).to(dtype=dtype, device=device)


def _resolve_centroids(centroids, num_clusters, Hq, D, device, length: int = 16) -> torch.Tensor:
    """The unit centroids ``(Hq, C, D)`` in float32 (both programs start from them)."""
    if centroids is None:
        # default ≈ √N clusters: O(N^1.5) time and memory, the paper's regime
        C = max(1, round(math.sqrt(length))) if num_clusters is None else num_clusters
        if isinstance(C, bool) or not isinstance(C, int) or C < 1:
            raise AttentionInputError(f"num_clusters must be a positive int, got {num_clusters!r}")
        return init_centroids(Hq, C, D, device=device)
    if not isinstance(centroids, torch.Tensor) or centroids.dim() != 3 or centroids.shape[0] != Hq \
            or centroids.shape[2] != D or centroids.shape[1] < 1:
        raise AttentionInputError(
            f"centroids must be a tensor (Hq, num_clusters, D) = ({Hq}, C, {D}), got "
            f"{fmt_shape(centroids) if isinstance(centroids, torch.Tensor) else type(centroids).__name__}"
        )
    if num_clusters is not None and num_clusters != centroids.shape[1]:
        raise AttentionInputError(
            f"num_clusters={num_clusters!r} disagrees with centroids of shape {fmt_shape(centroids)} "
            f"({centroids.shape[1]} clusters)"
        )
    return F.normalize(centroids.detach().to(device=device, dtype=torch.float32), dim=-1)


def _centroids_of(q, k, call) -> torch.Tensor:
    o = call.options
    return _resolve_centroids(o.centroids, o.num_clusters, call.q_heads, call.head_dim, q.device,
                              max(call.q_len, call.kv_len))


# ------------------------------------------------------------------------ reference


@method("routing", options=RoutingOptions,
        summary="online k-means routing: each query attends the keys of its clusters (balanced top-k)",
        paper="Efficient Content-Based Sparse Attention with Routing Transformers",
        time="O(N (N/C) D)", memory="O(N N/C)", rows_independent=False,
        causal_leak=("a query's cluster and the balanced cluster windows are decided over the whole sequence, so "
                     "which earlier keys it attends to depends on later tokens"))
def routing(q, k, v, call):
    """Dense masked softmax over the routed pairs, the clusters formed one at a time.

    For each cluster c: the affinity ``x̂·μ_c`` of every normalised query and key; the
    cluster's members are the ``ceil(N/C)`` tokens of largest affinity: those above the
    ``ceil(N/C)``-th largest value, then those equal to it, earliest first (padded keys
    last). Query i may attend key j iff some cluster holds both.
    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    mu = _centroids_of(q, k, call).to(torch.float64)
    C = mu.shape[1]
    wq, wk = min(Nq, -(-Nq // C)), min(Nk, -(-Nk // C))
    with torch.no_grad():
        qs, ks = selection_input(q), selection_input(repeat_kv(k, Hq))
        q_hat = qs / qs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        k_hat = ks / ks.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        allowed = torch.zeros(B, Hq, Nq, Nk, dtype=torch.bool, device=q.device)
        for c in range(C):
            centre = mu[:, c].view(1, Hq, 1, D)
            aff_q = selection_scores((q_hat * centre).sum(-1))  # (B, Hq, Nq)
            aff_k = selection_scores((k_hat * centre).sum(-1))  # (B, Hq, Nk)
            if call.key_mask is not None:  # padded keys rank last
                aff_k = aff_k.masked_fill(~call.key_mask.view(B, 1, Nk), float("-inf"))
            in_q = top_by_threshold(aff_q, wq)  # Q_c
            in_k = top_by_threshold(aff_k, wk)  # K_c
            allowed |= in_q.unsqueeze(-1) & in_k.unsqueeze(-2)
    return routed_softmax(q, k, v, call, allowed)


# ----------------------------------------------------------------------------- fast


def _members(x: torch.Tensor, mu: torch.Tensor, size: int, real: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Balanced top-k by a stable sort: for each cluster the ``size`` tokens of largest
    affinity, ties to the earlier token, returned in ascending position order; tokens
    with ``real`` False (padding, (B, N)) rank last. x (B, H, N, D) float64, mu (H, C, D)
    float64 -> (B, H, C, size)."""
    aff = selection_scores(torch.einsum("bhnd,hcd->bhcn", F.normalize(x, dim=-1), mu))
    if real is not None:
        aff = aff.masked_fill(~real.view(real.shape[0], 1, 1, -1), float("-inf"))
    # the set a stable sort's first ``size`` give, by topk (O(N) per cluster, not a sort's
    # O(N log N): the sort was 60 % of the forward at N = 16,384 with √N clusters)
    return stable_topk(aff, size, ordered=False)[1].sort(dim=-1).values


def route(q, k, *, centroids=None, num_clusters=None, key_mask=None):
    """The fast form's routing selection (no gradients). ``key_mask``: ``(B, Nk)`` bool,
    True = real key (padded keys rank last), or None.

    Returns ``(q_idx (B, Hq, C, wq), k_idx (B, Hq, C, wk))``: the member positions of each
    cluster, ``wq = ceil(Nq/C)``, ``wk = ceil(Nk/C)`` (at most the length)."""
    _, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    with torch.no_grad():
        mu = _resolve_centroids(centroids, num_clusters, Hq, D, q.device, max(Nq, Nk)).to(torch.float64)
        C = mu.shape[1]
        q_idx = _members(selection_input(q), mu, min(Nq, -(-Nq // C)))
        k_idx = _members(selection_input(repeat_kv(k, Hq)), mu, min(Nk, -(-Nk // C)), key_mask)
    return q_idx, k_idx


def selected_mask(q_idx, k_idx, Nq, Nk) -> torch.Tensor:
    """Dense ``(B, Hq, Nq, Nk)`` bool: query i may attend key j (before causal/mask/padding)."""
    B, H, C, _ = q_idx.shape
    qm = torch.zeros(B, H, C, Nq, dtype=torch.float32, device=q_idx.device).scatter_(3, q_idx, 1.0)
    km = torch.zeros(B, H, C, Nk, dtype=torch.float32, device=k_idx.device).scatter_(3, k_idx, 1.0)
    return (qm.transpose(-1, -2) @ km) > 0


@routing.impl("cluster",
              description="gathered cluster members, per-cluster softmax merged exactly: O(N·N/C) memory")
def cluster_attention(q, k, v, call):
    """Per-cluster dense softmax over gathered members, merged exactly per query."""
    B, Hq, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    scale, mask, key_mask = call.scale, call.mask, call.key_mask
    ct = compute_dtype(q.dtype)
    o = call.options
    q_idx, k_idx = route(q, k, centroids=o.centroids, num_clusters=o.num_clusters, key_mask=key_mask)
    C, wq, wk = q_idx.shape[2], q_idx.shape[3], k_idx.shape[3]
    offset = Nk - Nq
    with torch.no_grad():
        qp, kp = q_idx.unsqueeze(-1), k_idx.unsqueeze(-2)  # (B, H, C, wq, 1), (B, H, C, 1, wk)
        ok = torch.ones(B, Hq, C, wq, wk, dtype=torch.bool, device=q.device)
        if call.causal:
            ok &= kp <= qp + offset
        if isinstance(mask, torch.Tensor):
            ok &= mask_at(mask, qp, kp)
        elif mask is not None:  # a mask_mod, evaluated at the gathered (query, key) pairs only
            bi = torch.arange(B, device=q.device).view(B, 1, 1, 1, 1)
            hi = torch.arange(Hq, device=q.device).view(1, Hq, 1, 1, 1)
            ok &= mask(bi, hi, qp, kp)
        if key_mask is not None:
            ok &= key_mask[torch.arange(B, device=q.device).view(B, 1, 1, 1, 1), kp]
        if C > 1:  # a key already counted for this query in an earlier cluster: drop it here
            qin = torch.zeros(B, Hq, C, Nq, dtype=ct, device=q.device).scatter_(3, q_idx, 1.0)
            kin = torch.zeros(B, Hq, C, Nk, dtype=ct, device=q.device).scatter_(3, k_idx, 1.0)
            qmem = torch.gather(qin.transpose(2, 3), 2, q_idx.reshape(B, Hq, C * wq, 1).expand(-1, -1, -1, C))
            kmem = torch.gather(kin.transpose(2, 3), 2, k_idx.reshape(B, Hq, C * wk, 1).expand(-1, -1, -1, C))
            earlier = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1).to(ct)  # [c, c'] = c' < c
            qmem = qmem.view(B, Hq, C, wq, C) * earlier.view(1, 1, C, 1, C)
            ok &= (qmem @ kmem.view(B, Hq, C, wk, C).transpose(-1, -2)) == 0
    kr, vr = repeat_kv(k, Hq), repeat_kv(v, Hq)
    qg = torch.gather(q, 2, q_idx.reshape(B, Hq, C * wq, 1).expand(-1, -1, -1, D)).view(B, Hq, C, wq, D).to(ct)
    kg = torch.gather(kr, 2, k_idx.reshape(B, Hq, C * wk, 1).expand(-1, -1, -1, D)).view(B, Hq, C, wk, D).to(ct)
    vg = torch.gather(vr, 2, k_idx.reshape(B, Hq, C * wk, 1).expand(-1, -1, -1, Dv)).view(B, Hq, C, wk, Dv).to(ct)
    s = ((qg @ kg.transpose(-1, -2)) * scale).masked_fill(~ok, float("-inf"))
    flat_q = q_idx.reshape(B, Hq, C * wq)
    with torch.no_grad():  # one shift per query, shared by its clusters (the result does not depend on it)
        m = torch.full((B, Hq, Nq), float("-inf"), dtype=ct, device=q.device)
        m = m.scatter_reduce(2, flat_q, s.detach().amax(-1).reshape(B, Hq, C * wq), reduce="amax")
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        shift = torch.gather(m, 2, flat_q).view(B, Hq, C, wq, 1)
    e = torch.exp(s - shift)
    num = torch.zeros(B, Hq, Nq, Dv, dtype=ct, device=q.device).scatter_add(
        2, flat_q.unsqueeze(-1).expand(-1, -1, -1, Dv), (e @ vg).reshape(B, Hq, C * wq, Dv))
    den = torch.zeros(B, Hq, Nq, dtype=ct, device=q.device).scatter_add(2, flat_q, e.sum(-1).reshape(B, Hq, C * wq))
    den = den.unsqueeze(-1)
    empty = den == 0  # nothing visible: zeros (NaN inputs still propagate)
    out = torch.where(empty, torch.zeros_like(num), num / torch.where(empty, torch.ones_like(den), den))
    if stats.active():
        with torch.no_grad():
            cnt = torch.zeros(B, Hq, Nq, dtype=torch.float32, device=q.device).scatter_add(
                2, flat_q, ok.sum(-1).reshape(B, Hq, C * wq).to(torch.float32))
            stats.report("density", mean_density(cnt, real_visible_counts(call.causal, Nq, Nk, key_mask, q.device)))
            # queries that balanced top-k membership left in no cluster get zeros: say how many
            routed = torch.zeros(B, Hq, Nq, dtype=torch.bool, device=q.device).scatter_(2, flat_q, True)
            stats.report("unrouted", float((~routed).float().mean()))
    return out.to(q.dtype)


# --------------------------------------------------------------------------- module


@routing.module_class
class RoutingAttention(torch.nn.Module):
    """Routing attention with its k-means centroids as a buffer ``(heads, C, head_dim)``;
    call it like the functional form: ``module(q, k, v, causal=..., key_mask=...)``.
    In training mode each call also moves the centroids toward the mean of the normalised
    queries and keys nearest to them (exponential moving average with ``decay``); in eval
    mode they stay fixed."""

    def __init__(self, heads: int, head_dim: int, kv_heads: Optional[int] = None, v_dim: Optional[int] = None,
                 impl: str = "auto", num_clusters: int = 4, decay: float = 0.999):
        super().__init__()
        if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
            raise AttentionInputError(f"num_clusters must be a positive int, got {num_clusters!r}")
        if not 0.0 <= float(decay) <= 1.0:
            raise AttentionInputError(f"decay must be in [0, 1], got {decay!r}")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads or heads, head_dim
        self.impl, self.num_clusters, self.decay = impl, num_clusters, float(decay)
        self.register_buffer("centroids", init_centroids(heads, num_clusters, head_dim))

    def forward(self, q, k, v, **kwargs):
        kwargs.setdefault("impl", self.impl)
        out = routing(q, k, v, centroids=self.centroids, **kwargs)
        if self.training:
            real = kwargs.get("key_mask")  # True = real key
            padding = kwargs.get("key_padding_mask")  # nn.MultiheadAttention's: True = padding
            if real is None and padding is not None:
                real = ~padding
            self.update_centroids(q, k, key_mask=real)
        return out

    @torch.no_grad()
    def update_centroids(self, q, k, key_mask=None) -> None:
        """One online k-means step: ``μ_c ← decay·μ_c + (1-decay)·mean(x̂ assigned to c)``
        over the normalised queries and the real keys (``key_mask``: ``(B, Nk)`` bool,
        True = real key, or None), then renormalised."""
        Hq = q.shape[1]
        mu = F.normalize(self.centroids.to(torch.float32), dim=-1)
        C, D = mu.shape[1], mu.shape[2]
        qn = F.normalize(q.detach().to(torch.float32), dim=-1)
        kn = F.normalize(repeat_kv(k.detach(), Hq).to(torch.float32), dim=-1)
        wq = torch.ones(qn.shape[:3], dtype=torch.float32, device=q.device)
        wk = torch.ones(kn.shape[:3], dtype=torch.float32, device=q.device)
        if key_mask is not None:
            wk = wk * key_mask.view(kn.shape[0], 1, -1).to(torch.float32)
        sums = torch.zeros(Hq, C, D, dtype=torch.float32, device=q.device)
        counts = torch.zeros(Hq, C, dtype=torch.float32, device=q.device)
        for x, w in ((qn, wq), (kn, wk)):
            assign = torch.einsum("bhnd,hcd->bhnc", x, mu).argmax(-1)  # nearest centroid
            onehot = F.one_hot(assign, C).to(torch.float32) * w.unsqueeze(-1)  # (B, H, N, C)
            sums += torch.einsum("bhnc,bhnd->hcd", onehot, x)
            counts += onehot.sum(dim=(0, 2))
        has = counts > 0
        mean = sums / counts.clamp_min(1.0).unsqueeze(-1)
        new = torch.where(has.unsqueeze(-1), self.decay * mu + (1 - self.decay) * mean, mu)
        self.centroids.copy_(F.normalize(new, dim=-1).to(self.centroids.dtype))

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"num_clusters={self.num_clusters}, decay={self.decay}")

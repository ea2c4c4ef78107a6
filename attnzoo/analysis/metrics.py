"""Head metrics: functions over captured attention maps.

Every function takes ``maps: (..., Nq, Nk)`` — rows are queries, each a distribution over
the keys (rows sum to 1, or to 0 for a query that sees nothing) — and reduces over the
queries, returning one number per leading index: maps ``(B, H, Nq, Nk)`` give ``(B, H)``,
a stack ``(L, B, H, Nq, Nk)`` gives ``(L, B, H)``. ``per_query=True`` skips that last
reduction and returns ``(..., Nq)`` (what :func:`attnzoo.analysis.capture` accumulates on
the fly, query chunk by query chunk, instead of keeping N×N maps).

Masks: ``query_mask`` (True = a real query) is broadcastable to ``(..., Nq)``; a 2-D
``(B, Nq)`` mask (a tokenizer's ``attention_mask``) is read as ``(B, 1, Nq)``, i.e. the
maps are ``(..., B, H, Nq, Nk)``. The same holds for per-key tensors ``(B, Nk)``.

============================  ===========================================================
metric                        definition (row ``a_i`` = the weights of query ``i``)
============================  ===========================================================
:func:`entropy`               ``H_i = -Σ_j a_ij log a_ij`` (nats), mean over queries
:func:`attention_distance`    ``Σ_j a_ij d(i, j)``: token distance ``|i - j|`` (queries
                              aligned lower-right when ``Nq != Nk``) or, with
                              ``grid=(H, W)``, the Euclidean distance of the patches
:func:`key_mass`              ``(1/Nq) Σ_i a_ij``: the mass each key receives
:func:`sink_score`            ``Σ_{j ∈ S} key_mass_j`` for sink keys ``S`` (first token,
                              special tokens)
:func:`find_sinks`            keys whose mass exceeds ``alpha / n`` (``n`` keys)
:func:`retrieval_score`       fraction of copy events whose argmax key holds the copied
                              token inside the needle
:func:`head_divergence`       Jensen–Shannon divergence between two maps' rows
:func:`head_output_divergence`  ``1 - cos`` between two runs' head outputs
============================  ===========================================================

Papers: "Efficient Streaming Language Models with Attention Sinks" (the first tokens
collect a large share of the attention whatever their content); "Unveiling and
Harnessing Hidden Attention Sinks: Enhancing Large Language Models without Training
through Attention Calibration" (ACT: sinks later in the sequence too, found by a
threshold on the received attention); "Retrieval Head Mechanistically Explains
Long-Context Factuality" (the retrieval score); "Cracking the Code of Hallucination in
LVLMs with Vision-aware Head Divergence" (a head's sensitivity to a context: its output
with and without it); mean attention distance as in "An Image is Worth 16x16 Words".
Rollout, flow and rank correlations are in :mod:`attnzoo.analysis.aggregate` and
:mod:`attnzoo.analysis.attribution`.

Cost: each metric is one pass over the maps, ``O(Nq · Nk)`` per head.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from ..errors import AttentionInputError, fmt_shape

#: Targets that mark "no copy event here" (the ``ignore_index`` of cross-entropy).
IGNORE = -100


def _check_maps(maps, name="maps") -> torch.Tensor:
    if not isinstance(maps, torch.Tensor) or maps.dim() < 2:
        got = fmt_shape(maps) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise AttentionInputError(f"{name} must be a tensor (..., Nq, Nk) of attention weights, got {got}")
    return maps if maps.is_floating_point() else maps.float()


def _lift(mask: Optional[torch.Tensor], ndim: int) -> Optional[torch.Tensor]:
    """A 2-D ``(B, N)`` mask against tensors ``(..., B, H, N)`` reads as ``(B, 1, N)``."""
    if mask is None:
        return None
    mask = torch.as_tensor(mask)
    if mask.dim() == 2 and ndim >= 3:
        mask = mask[:, None, :]
    return mask.bool()


def reduce_queries(values: torch.Tensor, query_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of ``values (..., Nq)`` over the real queries (``query_mask``, see the module doc);
    a row with no real query gives 0."""
    m = _lift(query_mask, values.dim())
    if m is None:
        return values.mean(-1)
    m = m.to(values.device).expand_as(values).to(values.dtype)
    return (values * m).sum(-1) / m.sum(-1).clamp_min(1)


def entropy(maps: torch.Tensor, *, query_mask=None, normalize: bool = False, per_query: bool = False):
    """Attention entropy per head: ``H_i = -Σ_j a_ij log a_ij`` in nats, mean over queries.

    maps: ``(..., Nq, Nk)`` -> ``(...)`` (or ``(..., Nq)`` with ``per_query``). Uniform over
    ``n`` keys gives ``log n``, one-hot gives 0. ``normalize`` divides by ``log Nk`` (1 =
    uniform over every key). AEM ("Attention Entropy Maximization ...") and the
    over-concentration analyses read low entropy as a head focusing on a few tokens.
    """
    a = _check_maps(maps).clamp_min(0)
    h = -torch.special.xlogy(a, a).sum(-1)
    if normalize:
        h = h / math.log(a.shape[-1]) if a.shape[-1] > 1 else torch.zeros_like(h)
    return h if per_query else reduce_queries(h, query_mask)


def _positions(Nq: int, Nk: int, device, query_positions=None, grid=None):
    """Distance matrix ``(Nq, Nk)`` between query and key positions."""
    if query_positions is None:
        qpos = torch.arange(Nq, device=device) + (Nk - Nq)  # lower-right alignment
    else:
        qpos = torch.as_tensor(query_positions, device=device)
    kpos = torch.arange(Nk, device=device)
    if grid is None:
        return (qpos[:, None] - kpos[None, :]).abs().to(torch.float64)
    H, W = int(grid[0]), int(grid[1])
    if H * W != Nk:
        raise AttentionInputError(f"grid={tuple(grid)} has {H * W} cells but the maps have Nk={Nk} keys "
                                  "(slice off the [CLS] and register tokens first)")
    qy, qx = (qpos // W).double(), (qpos % W).double()
    ky, kx = (kpos // W).double(), (kpos % W).double()
    return torch.sqrt((qy[:, None] - ky[None, :]) ** 2 + (qx[:, None] - kx[None, :]) ** 2)


def attention_distance(maps: torch.Tensor, *, grid: Optional[Sequence[int]] = None, query_mask=None,
                       query_positions=None, per_query: bool = False):
    """Mean attention distance per head: ``Σ_j a_ij d(i, j)``, mean over queries.

    maps: ``(..., Nq, Nk)`` -> ``(...)``. ``d`` is the token distance ``|p_i - j|`` with query
    ``i`` at position ``p_i = i + Nk - Nq`` (lower-right, as a cache aligns it; pass
    ``query_positions`` for a chunk of rows), or with ``grid=(H, W)`` the Euclidean
    distance between the patches of row-major tokens (ViT's "mean attention distance";
    ``Nq = Nk = H·W``). A diagonal map gives 0; uniform over ``N`` tokens gives
    ``(N² - 1) / (3N)``.
    """
    a = _check_maps(maps)
    d = _positions(a.shape[-2], a.shape[-1], a.device, query_positions, grid).to(a.dtype)
    per = (a * d).sum(-1)
    return per if per_query else reduce_queries(per, query_mask)


def key_mass(maps: torch.Tensor, *, query_mask=None) -> torch.Tensor:
    """Attention each key receives, averaged over the (real) queries: ``(..., Nq, Nk) -> (..., Nk)``.
    Sums to 1 over the keys when every row does."""
    a = _check_maps(maps)
    m = _lift(query_mask, a.dim() - 1)
    if m is None:
        return a.mean(-2)
    w = m.to(a.device).to(a.dtype).expand(a.shape[:-1])
    return (a * w[..., None]).sum(-2) / w.sum(-1, keepdim=True).clamp_min(1)


def _sink_selector(sinks, Nk: int, device) -> torch.Tensor:
    """``sinks`` (int, sequence of ints, or bool ``(Nk,)`` / ``(B, Nk)``) as a bool tensor."""
    if isinstance(sinks, torch.Tensor) and sinks.dtype == torch.bool:
        if sinks.shape[-1] != Nk:
            raise AttentionInputError(f"sinks must have Nk={Nk} entries on its last dim, got {fmt_shape(sinks)}")
        return sinks.to(device)
    idx = [int(sinks)] if isinstance(sinks, int) else [int(i) for i in sinks]
    sel = torch.zeros(Nk, dtype=torch.bool, device=device)
    for i in idx:
        if not -Nk <= i < Nk:
            raise AttentionInputError(f"sink position {i} is outside the {Nk} keys")
        sel[i] = True
    return sel


def sink_score_from_mass(mass: torch.Tensor, sinks: Union[int, Sequence[int], torch.Tensor] = 0) -> torch.Tensor:
    """:func:`sink_score` from the received mass ``(..., Nk)`` of :func:`key_mass`."""
    sel = _sink_selector(sinks, mass.shape[-1], mass.device)
    sel = _lift(sel, mass.dim()) if sel.dim() == 2 else sel
    return (mass * sel.to(mass.dtype)).sum(-1)


def sink_score(maps: torch.Tensor, sinks: Union[int, Sequence[int], torch.Tensor] = 0, *, query_mask=None):
    """Attention-sink score per head: the share of the attention that goes to the sink keys.

    maps: ``(..., Nq, Nk)`` -> ``(...)``: ``Σ_{j ∈ sinks} (1/Nq) Σ_i a_ij``. ``sinks``: key
    positions (default the first token, StreamingLLM's sink; ``[0, n - 1]`` for BERT's
    [CLS] and [SEP]) or a bool mask ``(Nk,)`` / ``(B, Nk)`` (e.g. a tokenizer's
    ``special_tokens_mask``). A map whose every row puts all its mass on key 0 scores 1
    with ``sinks=0``; a uniform map scores ``len(sinks) / Nk``.
    """
    return sink_score_from_mass(key_mass(maps, query_mask=query_mask), sinks)


def find_sinks(maps: torch.Tensor, *, alpha: float = 5.0, query_mask=None, key_mask=None) -> torch.Tensor:
    """Sink tokens per head, as ACT finds them: keys whose received attention
    (:func:`key_mass`) exceeds ``alpha / n``, ``n`` the number of (real) keys.

    maps: ``(..., Nq, Nk)`` -> bool ``(..., Nk)``. [J] ACT thresholds the average attention
    a token receives against a multiple of the uniform share ``1/n``; ``alpha = 5`` is
    our default (a key that gets five times its fair share). A uniform map has no sink; a
    sink-column map has exactly its column.
    """
    mass = key_mass(maps, query_mask=query_mask)
    km = _lift(key_mask, mass.dim())
    n = torch.full(mass.shape[:-1], mass.shape[-1], dtype=mass.dtype, device=mass.device)
    if km is not None:
        n = km.to(mass.device).expand_as(mass).to(mass.dtype).sum(-1)
    out = mass > (float(alpha) / n.clamp_min(1))[..., None]
    return out if km is None else out & km.to(out.device)


def retrieval_from_argmax(top: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor,
                          needle: Optional[torch.Tensor] = None, *, query_mask=None, per_query: bool = False):
    """:func:`retrieval_score` from the argmax key of each query, ``top (..., B, H, Nq)``."""
    tokens = torch.as_tensor(tokens).to(top.device)
    targets = torch.as_tensor(targets).to(top.device)
    if tokens.dim() != 2 or targets.dim() != 2 or tokens.shape[0] != targets.shape[0]:
        raise AttentionInputError(f"tokens must be (B, Nk) and targets (B, Nq), got {fmt_shape(tokens)} and "
                                  f"{fmt_shape(targets)}")
    if top.dim() < 3 or top.shape[-3] != tokens.shape[0] or top.shape[-1] != targets.shape[1]:
        raise AttentionInputError(f"maps must be (..., B, H, Nq, Nk) with B={tokens.shape[0]}, Nq={targets.shape[1]}, "
                                  f"got argmax of shape {fmt_shape(top)}")
    lead = top.shape[:-1]
    tok = tokens[:, None, :].expand(*lead[:-2], tokens.shape[0], lead[-1], tokens.shape[1])
    attended = tok.gather(-1, top)
    hit = attended == targets[:, None, :]
    if needle is not None:
        nd = torch.as_tensor(needle).bool().to(top.device)
        nd = nd[:, None, :].expand(*lead[:-2], tokens.shape[0], lead[-1], tokens.shape[1])
        hit = hit & nd.gather(-1, top)
    events = targets[:, None, :] != IGNORE
    qm = _lift(query_mask, 3)
    if qm is not None:
        events = events & qm.to(events.device)
    events = events.expand_as(hit)
    hit = hit & events
    if per_query:
        return hit.to(torch.float32)
    return hit.sum(-1).to(torch.float32) / events.sum(-1).clamp_min(1).to(torch.float32)


def retrieval_score(maps: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor,
                    needle: Optional[torch.Tensor] = None, *, query_mask=None, per_query: bool = False):
    """Retrieval score per head ("Retrieval Head Mechanistically Explains Long-Context
    Factuality"): the fraction of copy events at which the head's most attended key
    holds the token being produced, inside the needle.

    maps: ``(..., B, H, Nq, Nk)``; ``tokens: (B, Nk)`` the key tokens; ``targets: (B, Nq)``
    the token each query produces (the model's output, or the known answer), ``-100``
    where there is no copy event; ``needle: (B, Nk)`` bool, the keys a copy may come from
    (default: all). Returns ``(..., B, H)``: ``|{i : tokens[argmax_j a_ij] = targets[i],
    argmax ∈ needle}| / |{i : a copy event}|``.

    [J] The paper counts, during generation on needle-in-a-haystack prompts, the needle
    tokens a head "copies" (top-1 attention on a needle token equal to the generated
    token) over the needle length; over a probe where each copy event is one query, that
    is this fraction. A head whose one-hot attention points at the target scores 1.
    """
    a = _check_maps(maps)
    return retrieval_from_argmax(a.argmax(-1), tokens, targets, needle, query_mask=query_mask, per_query=per_query)


def head_divergence(maps_a: torch.Tensor, maps_b: torch.Tensor, *, query_mask=None, per_query: bool = False):
    """Jensen–Shannon divergence (nats) between two captures' attention rows, per head.

    maps_a, maps_b: ``(..., Nq, Nk)`` of the same shape -> ``(...)``: mean over queries of
    ``½ KL(a ‖ m) + ½ KL(b ‖ m)``, ``m = (a + b)/2``. 0 for equal maps, ``log 2`` for rows
    with disjoint supports. Used for a context ablation: the same probe with part of the
    context replaced (:func:`attnzoo.analysis.context_ablation`); a head that moves its
    attention when the context changes is sensitive to it.
    """
    a, b = _check_maps(maps_a, "maps_a").clamp_min(0), _check_maps(maps_b, "maps_b").clamp_min(0)
    if a.shape != b.shape:
        raise AttentionInputError(f"maps_a and maps_b must have the same shape, got {fmt_shape(a)} and {fmt_shape(b)}")
    m = 0.5 * (a + b)
    kl = lambda p: (torch.special.xlogy(p, p) - torch.special.xlogy(p, m)).sum(-1)  # noqa: E731
    js = (0.5 * kl(a) + 0.5 * kl(b)).clamp_min(0)
    return js if per_query else reduce_queries(js, query_mask)


def head_output_divergence(out_a: torch.Tensor, out_b: torch.Tensor, *, query_mask=None, eps: float = 1e-12):
    """``1 - cos(o_a, o_b)`` between two runs' per-head outputs ``(..., Nq, Dv)``, mean over
    queries -> ``(...)``. [J] Our reading of VHD ("sensitivity of attention head outputs
    to visual context"): the same head's output with and without a context, compared by
    direction. 0 when equal, 2 when opposite."""
    if out_a.shape != out_b.shape:
        raise AttentionInputError(f"out_a and out_b must have the same shape, got {fmt_shape(out_a)} and "
                                  f"{fmt_shape(out_b)}")
    a, b = out_a.float(), out_b.float()
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(eps)
    return reduce_queries(1 - cos, query_mask)


def ranking(table: torch.Tensor, k: Optional[int] = None, descending: bool = True) -> list:
    """``[(layer, head, value)]`` of a ``(L, H)`` table, best first (the top ``k``)."""
    if table.dim() != 2:
        raise AttentionInputError(f"ranking takes a (layers, heads) table, got {fmt_shape(table)}")
    flat = table.flatten()
    order = torch.argsort(flat, descending=descending, stable=True)
    H = table.shape[1]
    rows = [(int(i) // H, int(i) % H, float(flat[i])) for i in order]
    return rows[:k] if k is not None else rows

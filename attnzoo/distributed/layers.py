"""The sequence-parallel layer: :class:`SequenceParallelAttention`, an
:class:`attnzoo.Attention` whose forward takes this rank's shard of the sequence.

    sp = SequenceParallel(group=None, strategy="auto", layout="zigzag")
    attn = SequenceParallelAttention(dim=512, heads=8, method="softmax", causal=True, rotary=True,
                                     sequence_parallel=sp)
    y_local = attn(x_local)            # x_local: (B, n_r, dim), this rank's tokens in the layout

The projections, rotary embeddings (at the tokens' *global* positions), QK-norm and the
gate are the layer's, per token, so they run on the shard as they are; only the attention
between tokens crosses ranks, through one of the strategies:

=============  =====================================================================
``ring``       exact softmax, K/V blocks around the ring (:func:`ring_attention`)
``ulysses``    any method, all-to-all to head shards (:func:`ulysses_attention`)
``lasp2``      ``lightning`` / ``linear``, all-gather of the states (:func:`lasp2`)
``allgather``  exact softmax over all-gathered K/V (LASP-2H's softmax layers)
``halo``       ``sliding_window`` / 1-D ``neighborhood``, halo exchange
``lasp2h``     a hybrid stack: ``lasp2`` for linear layers, ``allgather`` for softmax
               (other layers as ``auto``)
``auto``       ``lasp2`` for linear methods, ``halo`` for windows, ``ring`` for plain
               softmax, ``ulysses`` for everything else
=============  =====================================================================

The state dict is :class:`~attnzoo.Attention`'s, so weights load either way, and
:func:`parallelize` turns every ``Attention`` of a model into this class in place. Each
rank's parameter gradients cover its own tokens: sum them over the group (DDP or an
all-reduce does) to get the gradient of the whole sequence. [J] Masks, cross-attention,
attention dropout, returned weights and methods with parameters are not
sequence-parallel here (they raise); decoding (``init_cache``/``step``) is Attention's,
unsharded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from .. import registry
from ..errors import AttentionInputError
from ..layers import Attention
from . import comm
from .halo import HALO_METHODS, halo_attention
from .lasp2 import LASP2_METHODS, allgather_attention, lasp2
from .layout import KINDS, SequenceLayout, resolve_layout
from .ring import ring_attention
from .ulysses import ulysses_attention

STRATEGIES = ("auto", "ring", "ulysses", "lasp2", "allgather", "halo", "lasp2h")


@dataclass(frozen=True)
class SequenceParallel:
    """How a layer runs sequence-parallel.

    Attributes:
        group: the process group (None: the world).
        strategy: one of :data:`STRATEGIES`.
        layout: ``"contiguous"``, ``"zigzag"`` or a :class:`SequenceLayout`.
    """

    group: Any = None
    strategy: str = "auto"
    layout: Union[str, SequenceLayout] = "contiguous"

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise AttentionInputError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if not isinstance(self.layout, SequenceLayout) and self.layout not in KINDS:
            raise AttentionInputError(f"layout must be one of {', '.join(KINDS)} or a SequenceLayout, got "
                                      f"{self.layout!r}")


def as_config(sequence_parallel) -> SequenceParallel:
    """A :class:`SequenceParallel` from itself, a process group, a strategy name or None."""
    if isinstance(sequence_parallel, SequenceParallel):
        return sequence_parallel
    if isinstance(sequence_parallel, str):
        return SequenceParallel(strategy=sequence_parallel)
    return SequenceParallel(group=sequence_parallel)


def choose_strategy(strategy: str, method: str, options: dict) -> str:
    """The concrete strategy for ``method``, or an error saying why it cannot run it."""
    spec = registry.get(method)
    if strategy == "auto":
        if method in LASP2_METHODS:
            return "lasp2"
        if method in HALO_METHODS and not (method == "neighborhood" and options.get("grid") is not None):
            return "halo"
        if spec.exact and not options:
            return "ring"
        return "ulysses"
    if strategy == "lasp2h":
        if method in LASP2_METHODS:
            return "lasp2"
        if spec.exact:
            return "allgather"
        return choose_strategy("auto", method, options)
    if strategy == "ring" and (not spec.exact or options):
        raise AttentionInputError(f"strategy 'ring' runs plain exact softmax (no options), not method {method!r} "
                                  f"with {options or 'its defaults'}; use 'ulysses' or 'allgather'")
    if strategy == "lasp2" and method not in LASP2_METHODS:
        raise AttentionInputError(f"strategy 'lasp2' runs {', '.join(LASP2_METHODS)}, not {method!r}")
    if strategy == "halo" and method not in HALO_METHODS:
        raise AttentionInputError(f"strategy 'halo' runs {', '.join(HALO_METHODS)}, not {method!r}")
    if strategy == "allgather" and not spec.exact:
        raise AttentionInputError(f"strategy 'allgather' runs exact softmax, not {method!r}; use 'ulysses'")
    return strategy


def sequence_parallel_attention(q, k, v, sequence_parallel=None, *, method: str = "softmax", causal: bool = False,
                                scale: Optional[float] = None, impl: str = "auto", **options) -> torch.Tensor:
    """``method`` over local shards ``q (B, Hq, n_r, D)``, ``k``, ``v`` by the strategy of
    ``sequence_parallel`` (a :class:`SequenceParallel`, a group, a strategy name or None)."""
    sp = as_config(sequence_parallel)
    strategy = choose_strategy(sp.strategy, method, options)
    g, lay = sp.group, sp.layout
    if strategy == "ring":
        return ring_attention(q, k, v, g, causal=causal, scale=scale, layout=lay)
    if strategy == "lasp2":
        return lasp2(q, k, v, g, method=method, causal=causal, layout=lay, **options)
    if strategy == "halo":
        return halo_attention(q, k, v, g, method=method, causal=causal, scale=scale, layout=lay, impl=impl, **options)
    if strategy == "allgather":
        return allgather_attention(q, k, v, g, method=method, causal=causal, scale=scale, layout=lay, impl=impl,
                                   **options)
    return ulysses_attention(q, k, v, g, method=method, causal=causal, scale=scale, layout=lay, impl=impl, **options)


class SequenceParallelAttention(Attention):
    """:class:`attnzoo.Attention` over a sequence sharded across a process group.

    Takes :class:`~attnzoo.Attention`'s arguments plus ``sequence_parallel`` (a
    :class:`SequenceParallel`, a process group, a strategy name, or None for the world
    with ``strategy="auto"``). ``forward(x)``: ``x (B, n_r, dim)``, this rank's tokens in
    the layout -> ``(B, n_r, dim)``, equal to this rank's rows of ``Attention`` on the
    whole sequence.
    """

    def __init__(self, dim: int, heads: int = 8, kv_heads: Optional[int] = None, dim_head: Optional[int] = None, *,
                 sequence_parallel=None, **kwargs):
        super().__init__(dim, heads, kv_heads, dim_head, **kwargs)
        _check_layer(self, as_config(sequence_parallel))
        self.sequence_parallel = as_config(sequence_parallel)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, *, attn_mask=None, mask=None,
                key_padding_mask=None, key_mask=None, return_weights: bool = False):
        """x: ``(B, n_r, dim)``, this rank's shard -> ``(B, n_r, dim)``."""
        if context is not None or return_weights or any(m is not None for m in (attn_mask, mask, key_padding_mask,
                                                                                  key_mask)):
            raise AttentionInputError("SequenceParallelAttention takes self-attention without masks or returned "
                                      "weights (x only); run attnzoo.Attention for those")
        self._check_x(x)
        sp = self.sequence_parallel
        _, rank = comm.world_and_rank(sp.group)
        lay = resolve_layout(sp.layout, x.shape[1], sp.group)
        if not isinstance(sp.layout, SequenceLayout):
            sp = SequenceParallel(sp.group, sp.strategy, lay)  # resolved once for this forward
        positions = lay.positions(rank, x.device)  # rotary at the global positions
        q = self._queries(x, positions)
        k, v = self._keys_values(x, positions)
        out = sequence_parallel_attention(q, k, v, sp, method=self.method, causal=self.causal, impl=self.attn.impl,
                                          **self.attn.options)
        return self._output(x, out)

    def extra_repr(self) -> str:
        sp = self.sequence_parallel
        return super().extra_repr() + f", strategy={sp.strategy!r}, layout={getattr(sp.layout, 'kind', sp.layout)!r}"


def _check_layer(layer: Attention, sp: SequenceParallel) -> None:
    if layer.spec.module is not None:
        raise AttentionInputError(f"method {layer.method!r} has parameters (module {layer.spec.module.__name__}); "
                                  "sequence-parallel layers take parameter-free methods")
    if layer.dropout:
        raise AttentionInputError("sequence-parallel layers take no attention dropout (dropout=0)")
    choose_strategy(sp.strategy, layer.method, dict(layer.attn.options))


def parallelize(model: nn.Module, sequence_parallel=None) -> nn.Module:
    """Turn every :class:`~attnzoo.Attention` in ``model`` into a
    :class:`SequenceParallelAttention` in place (same parameters, same state dict) and
    return the model; the model's forward must then get this rank's shard of the
    sequence. ``sequence_parallel`` as in :class:`SequenceParallelAttention`."""
    sp = as_config(sequence_parallel)
    for m in model.modules():
        if type(m) is Attention:
            _check_layer(m, sp)
    for m in model.modules():
        if type(m) is Attention:
            m.__class__ = SequenceParallelAttention
            m.sequence_parallel = sp
    return model

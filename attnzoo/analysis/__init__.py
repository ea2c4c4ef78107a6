"""Attention analysis on real models: capture, head metrics, sinks, retrieval heads,
rollout and flow, attention-vs-gradient agreement, steering, token pruning, and the
``attnzoo inspect`` report.

    import attnzoo.analysis as aza
    cap = aza.capture(model, inputs)                  # attnzoo layers or a Hugging Face model
    cap.maps()                                        # (L, B, H, Nq, Nk), equal to output_attentions
    cap.entropy(), cap.distance(), cap.sink_score([0, -1])      # (L, B, H)
    aza.attention_rollout(cap.maps())          # (B, N, N)
    with aza.steer(model, mask_heads=[(1, 0)], calibrate=aza.SinkCalibration(heads=[(2, 3)])):
        model(**inputs)                               # heads switched off, sinks damped (ACT)
    run = aza.prune_tokens(model, inputs, layer=2, keep=0.5)   # EViT-style, by [CLS] attention

Modules: :mod:`~attnzoo.analysis.backends` (how a model's attention calls are
intercepted, without editing it), :mod:`~attnzoo.analysis.capture`,
:mod:`~attnzoo.analysis.metrics`, :mod:`~attnzoo.analysis.aggregate` (rollout, flow),
:mod:`~attnzoo.analysis.attribution`, :mod:`~attnzoo.analysis.steering`,
:mod:`~attnzoo.analysis.pruning`, :mod:`~attnzoo.analysis.probes`,
:mod:`~attnzoo.analysis.retrieval` (retrieval heads of a copy-trained model) and
:mod:`~attnzoo.analysis.report` (``attnzoo inspect``). Hugging Face models need
``attnzoo[hf]``; the report ``attnzoo[bench]``.
"""

from .aggregate import attention_flow, attention_rollout, residual_graph
from .attribution import attention_gradient_agreement, attention_importance, gradient_attribution, rank_correlation
from .backends import Site, intercept
from .capture import Capture, LayerRecord, capture, capturing
from .metrics import (attention_distance, entropy, find_sinks, head_divergence, head_output_divergence, key_mass,
                      ranking, retrieval_score, sink_score)
from .probes import ablate_tokens, context_ablation, repeat_probe, retrieval_probe_scores
from .pruning import Pruned, PruneRun, evit_prune, mean_pool, prune_tokens
from .steering import SinkCalibration, calibrate_sinks, head_ablation, head_shape, steer

__all__ = [
    "capture", "capturing", "Capture", "LayerRecord", "intercept", "Site",
    "entropy", "attention_distance", "key_mass", "sink_score", "find_sinks", "retrieval_score", "head_divergence",
    "head_output_divergence", "ranking",
    "attention_rollout", "attention_flow", "residual_graph",
    "rank_correlation", "gradient_attribution", "attention_importance", "attention_gradient_agreement",
    "steer", "SinkCalibration", "calibrate_sinks", "head_ablation", "head_shape",
    "evit_prune", "prune_tokens", "mean_pool", "Pruned", "PruneRun",
    "repeat_probe", "retrieval_probe_scores", "ablate_tokens", "context_ablation",
]

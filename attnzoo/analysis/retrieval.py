"""Retrieval heads where the answer is known: the benchmark's copy task.

"Retrieval Head Mechanistically Explains Long-Context Factuality" finds the few heads
that copy tokens from the context (retrieval score,
:func:`~attnzoo.analysis.metrics.retrieval_score`) and shows that masking them breaks
retrieval while masking random heads does not. :func:`copy_task_experiment` does the same
on a model whose task is nothing but retrieval:

1. train the benchmark's small causal LM (:func:`attnzoo.bench.tasks.suite.build_model`,
   two pre-norm blocks of :class:`attnzoo.layers.Attention`, rotary) on ``copy``
   (:func:`attnzoo.bench.tasks.cab.copy`: ``s_1..s_L 0 s_1..s_L``, loss on the copy) with
   :func:`attnzoo.bench.tasks.suite.run_task`'s recipe (AdamW β = (0.9, 0.98), weight
   decay 0.01, linear warm-up over 10% then cosine to 10% of ``lr``, clipping at 1);
2. score every head on held-out sequences: a copy event is a query of the copied half,
   the token being produced is the model's own prediction there (as in the paper, the
   generated token), the needle is the first segment;
3. retrieval heads = the heads scoring at least ``threshold``; mask them
   (:func:`~attnzoo.analysis.steering.steer`) and measure the copy accuracy, then mask as
   many heads drawn at random from the other heads, ``trials`` times.

[J] The paper's threshold is 0.1 over long needle prompts; a copy-trained model has
cleaner heads, and we default to 0.5. [J] Random heads are drawn among the
non-retrieval heads (the paper's control: masking random heads that are not retrieval
heads), and, as a second control, among all heads (any set but the retrieval set
itself). In a two-layer copy model every head of the second layer becomes a copy head
(they are redundant: one is enough), so the retrieval set is that layer; masking any
other set of as many heads leaves at least one copy head and the copy survives.
"""

from __future__ import annotations

import random
import time
from typing import Optional

import torch

from ..errors import AttentionInputError
from .capture import capture
from .metrics import IGNORE, ranking
from .steering import steer


def train_copy_model(*, seq_len: int = 16, vocab_size: int = 16, d_model: int = 32, heads: int = 4,
                     layers: int = 2, steps: int = 200, batch_size: int = 32, lr: float = 1e-2, seed: int = 0):
    """``(model, case)``: the benchmark's copy model trained as :func:`run_task` trains it."""
    from ..bench.tasks.suite import TaskCase, build_model, train_model

    case = TaskCase(task="copy", method="softmax", seq_len=seq_len, vocab_size=vocab_size, d_model=d_model,
                    heads=heads, layers=layers, steps=steps, batch_size=batch_size, lr=lr, seed=seed, impl="sdpa")
    torch.manual_seed(seed)
    model = build_model(case)
    train_model(model, case)
    model.eval()
    return model, case


def copy_accuracy(model, data: dict) -> float:
    """Next-token accuracy on the copied half of ``data`` (``inputs``, ``targets``)."""
    with torch.no_grad():
        logits = model(data["inputs"])
    keep = data["targets"] != IGNORE
    return float((logits.argmax(-1)[keep] == data["targets"][keep]).float().mean())


def copy_retrieval_scores(model, data: dict) -> torch.Tensor:
    """``(L, H)`` retrieval scores of ``model``'s heads on copy data (see the module doc)."""
    inputs, targets = data["inputs"], data["targets"]
    with torch.no_grad():
        logits = model(inputs)
    produced = torch.where(targets != IGNORE, logits.argmax(-1), torch.full_like(targets, IGNORE))
    first = (targets != IGNORE).long().argmax(-1)  # the separator's position: the needle lies before it
    pos = torch.arange(inputs.shape[1])[None, :]
    needle = (pos < first[:, None]) & (inputs != 0)
    cap = capture(model, inputs, maps=False, summaries=True)
    return cap.retrieval_score(inputs, produced, needle).mean(1)


def copy_task_experiment(*, seq_len: int = 16, vocab_size: int = 16, d_model: int = 32, heads: int = 4,
                         layers: int = 2, steps: int = 200, seed: int = 0, threshold: float = 0.5,
                         trials: int = 10, eval_examples: int = 256, model=None) -> dict:
    """Train, detect the retrieval heads, mask them and as many random others (module doc).

    Returns ``{"accuracy", "scores" (L, H), "retrieval_heads" [(l, h)], "masked_accuracy",
    "random_heads" [[(l, h)] per trial] drawn from the other heads, "random_accuracy" [per trial],
    "random_any_heads" / "random_any_accuracy" (drawn from all heads, never exactly the
    retrieval set), "train_s", "ranking" [(l, h, score)], "chance"}``."""
    from ..bench.tasks.cab import TASKS

    t0 = time.perf_counter()
    if model is None:
        model, _ = train_copy_model(seq_len=seq_len, vocab_size=vocab_size, d_model=d_model, heads=heads,
                                    layers=layers, steps=steps, seed=seed)
    train_s = time.perf_counter() - t0
    data = TASKS["copy"].make(eval_examples, seq_len, vocab_size, seed=seed * 1_000_003)
    acc = copy_accuracy(model, data)
    scores = copy_retrieval_scores(model, data)
    found = [(l, h) for l, h, s in ranking(scores) if s >= threshold]
    if not found:
        raise AttentionInputError(f"no head scores >= {threshold} (best {float(scores.max()):.2f}); the model "
                                  f"reached copy accuracy {acc:.2f}: train longer or lower the threshold")
    with steer(model, mask_heads=found):
        masked = copy_accuracy(model, data)
    others = [(l, h) for l in range(scores.shape[0]) for h in range(scores.shape[1]) if (l, h) not in found]
    rng = random.Random(seed)
    rand_sets, rand_acc = [], []
    for _ in range(trials if len(others) >= len(found) else 0):
        pick = sorted(rng.sample(others, len(found)))
        with steer(model, mask_heads=pick):
            rand_acc.append(copy_accuracy(model, data))
        rand_sets.append(pick)
    everyone = [(l, h) for l in range(scores.shape[0]) for h in range(scores.shape[1])]
    any_sets, any_acc = [], []
    for _ in range(trials if len(everyone) > len(found) else 0):
        pick = sorted(rng.sample(everyone, len(found)))
        while set(pick) == set(found):
            pick = sorted(rng.sample(everyone, len(found)))
        with steer(model, mask_heads=pick):
            any_acc.append(copy_accuracy(model, data))
        any_sets.append(pick)
    return {"random_any_heads": any_sets, "random_any_accuracy": any_acc,
            "accuracy": acc, "scores": scores, "retrieval_heads": found, "masked_accuracy": masked,
            "random_heads": rand_sets, "random_accuracy": rand_acc, "train_s": train_s,
            "ranking": ranking(scores), "chance": 1.0 / (vocab_size - 1)}


def main(argv: Optional[list] = None) -> int:  # pragma: no cover - a script entry point
    """``python -m attnzoo.analysis.retrieval``: print the experiment's figures."""
    torch.set_num_threads(1)
    r = copy_task_experiment()
    print(f"copy accuracy {r['accuracy']:.3f} (chance {r['chance']:.3f}), trained in {r['train_s']:.1f} s")
    print("retrieval scores (layer x head):")
    for l, row in enumerate(r["scores"].tolist()):
        print(f"  layer {l}: " + "  ".join(f"{s:.2f}" for s in row))
    print(f"retrieval heads (score >= 0.5): {r['retrieval_heads']}")
    print(f"masked: accuracy {r['masked_accuracy']:.3f}")
    for pick, a in zip(r["random_heads"], r["random_accuracy"]):
        print(f"random non-retrieval heads {pick}: accuracy {a:.3f}")
    for pick, a in zip(r["random_any_heads"], r["random_any_accuracy"]):
        print(f"random heads {pick}: accuracy {a:.3f}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

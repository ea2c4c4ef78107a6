"""A synthetic 2-D task for the vision methods: a label that needs attention across the
image.

``corners`` (noncausal self-attention on a grid): the tokens are the pixels of an
``H × W`` image in row-major order (``(H, W)`` the most square factorisation of
``seq_len``, the grid every vision method's sizing hook picks,
:func:`attnzoo.kernels.grid2d.square_grid`: 16 × 16 for 256 tokens). The image is black
(token 0) except for two coloured pixels, one at a uniformly random cell of the
top-left corner block and one in the bottom-right corner block (blocks of
``⌈H/4⌉ × ⌈W/4⌉`` cells), each of one of ``C = vocab_size - 1`` colours (tokens
``1 .. C``). The label, read at token 0 (the top-left pixel, as ``classify`` reads its
label at position 0), is whether the two pixels have the same colour (half of the
examples do; the other half two different colours).

Why it needs a pattern that reaches across the image: the two pixels are at least
``H/2`` rows and ``W/2`` columns apart, and the answer is in neither alone. A model whose
attention reaches only local windows cannot bring the bottom-right colour to token 0
(plain window attention never crosses its windows, whatever the depth; a window of
2 × 2 sees not even the top-left pixel). Softmax (a head at token 0 attending to the two
coloured tokens, whose mean tells same from different) learns it in a few hundred
steps of the suite's two-layer model. Chance: 1/2.

[J] The background is plain: with random colours everywhere and two *marked* pixels
(a first version), softmax stayed at chance after 300 steps (the label is a comparison
of two tokens among 256 look-alikes, no first-order signal to find them).
"""

from __future__ import annotations

import torch

from ...errors import AttentionInputError
from ...kernels.grid2d import square_grid
from .cab import TaskSpec


def corners(num_examples: int, seq_len: int, vocab_size: int, *, seed: int = 0) -> dict:
    """The ``corners`` task: ``{"inputs": (B, N) long, "labels": (B,) long}`` (label 1 = the
    two coloured pixels have the same colour), deterministic in ``seed``."""
    B, N, V = int(num_examples), int(seq_len), int(vocab_size)
    if B < 1:
        raise AttentionInputError(f"num_examples must be >= 1, got {num_examples}")
    if V < 3:
        raise AttentionInputError(f"corners needs vocab_size >= 3 (the background and two colours), got {vocab_size}")
    H, W = square_grid(N)
    if H < 2:
        raise AttentionInputError(
            f"corners needs a 2-D image: seq_len={N} has the most square grid {H} x {W}; use a seq_len with a "
            "factorisation of at least 2 rows (e.g. 256 = 16 x 16)")
    C = V - 1
    bh, bw = -(-H // 4), -(-W // 4)  # the corner blocks
    g = torch.Generator().manual_seed(int(seed))
    rows = torch.arange(B)
    ar, ac = torch.randint(0, bh, (B,), generator=g), torch.randint(0, bw, (B,), generator=g)
    br, bc = H - 1 - torch.randint(0, bh, (B,), generator=g), W - 1 - torch.randint(0, bw, (B,), generator=g)
    labels = torch.randint(0, 2, (B,), generator=g)
    colour_a = torch.randint(0, C, (B,), generator=g)
    other = (colour_a + torch.randint(1, C, (B,), generator=g)) % C  # a different colour
    colour_b = torch.where(labels.bool(), colour_a, other)
    image = torch.zeros(B, H, W, dtype=torch.long)
    image[rows, ar, ac] = 1 + colour_a
    image[rows, br, bc] = 1 + colour_b
    return {"inputs": image.reshape(B, N), "labels": labels}


#: The vision tasks the suite runs next to CAB's (:data:`attnzoo.bench.tasks.cab.TASKS`).
VISION_TASKS = {
    "corners": TaskSpec("corners", "noncausal_self", corners,
                        "2-D image: do the two pixels in opposite corners share a colour (label at token 0)",
                        lambda V, **_: 0.5),
}

"""Exact softmax attention and its drop-in variants: the same scores, another
normalisation (sigmoid, clipped softmax) or per-query temperatures (selective)."""

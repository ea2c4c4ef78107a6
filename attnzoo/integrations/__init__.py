"""Where users already are: :mod:`~attnzoo.integrations.sdpa` (``attnzoo.use``: route
every ``scaled_dot_product_attention`` call inside a block through a method) and
:mod:`~attnzoo.integrations.hf` (Hugging Face ``attn_implementation="attnzoo:<method>"``
backends)."""

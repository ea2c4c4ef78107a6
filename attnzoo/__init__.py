"""attnzoo: attention mechanisms from the literature behind one API.

    import attnzoo as az
    out = az.attention(q, k, v, method="softmax", causal=True)
    az.list_methods()                      # every registered method (MethodSpec)
    model = az.convert(hf_model, "hedgehog")  # a Hugging Face model's attention swapped and distilled
"""

from . import allocator

allocator.tune_on_import()  # freed temporaries stay in the heap: no page faults per call (attnzoo/allocator.py)

from . import methods  # noqa: E402,F401  (discovers and registers the built-in methods)
from .api import MethodModule, attention, build, config, detect_nan
from .errors import AttentionInputError, UnknownMethod, UnsupportedImpl, UnsupportedPattern
from .registry import PATTERNS, MethodOptions, MethodSpec, get, list_methods, method, register
from .layers import Attention, RotaryEmbedding
from .integrations.sdpa import use
from . import masks
from .conversion import convert

__version__ = "0.2.0"

__all__ = [
    "attention",
    "Attention",
    "RotaryEmbedding",
    "build",
    "MethodModule",
    "config",
    "detect_nan",
    "list_methods",
    "get",
    "method",
    "register",
    "MethodSpec",
    "MethodOptions",
    "PATTERNS",
    "AttentionInputError",
    "UnsupportedPattern",
    "UnknownMethod",
    "UnsupportedImpl",
    "masks",
    "methods",
    "use",
    "convert",
]

"""attnzoo: attention mechanisms from the literature behind one API.

    import attnzoo as az
    out = az.attention(q, k, v, method="softmax", causal=True)
"""

# Import the methods subpackage first (registering the built-in methods): importing a
# subpackage binds its name on the parent package, so the function `methods` below must
# be bound after it, or `attnzoo.methods` would be the subpackage.
from . import methods as _builtin_methods  # noqa: F401
from .api import attention, build, config
from .errors import AttentionInputError, UnknownMethod, UnsupportedImpl, UnsupportedPattern
from .registry import MethodSpec, PATTERNS, get, methods, register
from .layers import Attention, RotaryEmbedding
from . import masks

__version__ = "0.1.0"

__all__ = [
    "attention",
    "Attention",
    "RotaryEmbedding",
    "build",
    "config",
    "methods",
    "get",
    "register",
    "MethodSpec",
    "PATTERNS",
    "AttentionInputError",
    "UnsupportedPattern",
    "UnknownMethod",
    "UnsupportedImpl",
    "masks",
]

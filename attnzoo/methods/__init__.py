"""Built-in attention methods: importing this package registers them all."""

from . import softmax  # noqa: F401

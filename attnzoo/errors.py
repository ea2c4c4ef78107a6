"""Errors raised by attnzoo.

Every message names the argument, what was expected and what was received, so a
user can fix the call without reading the library's source.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class AttentionInputError(ValueError):
    """Bad input to an attention call: wrong rank, shape, dtype, device or option."""


class UnsupportedPattern(AttentionInputError):
    """The method cannot run in the requested attention pattern (e.g. causal cross)."""


class InputTooLarge(AttentionInputError):
    """The input exceeds the size a method declares it can take (a naive algorithm's
    limit, e.g. tensor attention's ``max_triples``); the message names the option that
    lifts it. The benchmark records such a case as not timed, with the message."""


class UnknownMethod(AttentionInputError, KeyError):
    """No method is registered under the requested name."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class UnsupportedImpl(AttentionInputError):
    """The requested implementation cannot serve this call (no silent fallback)."""


def closest(name: str, candidates: Iterable[str]) -> str:
    """A ' Did you mean ...?' suffix with the closest candidate names, or ''."""
    matches = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.5)
    if not matches:
        return ""
    return " Did you mean " + " or ".join(repr(m) for m in matches) + "?"


def fmt_shape(t) -> str:
    """Format a tensor's (or a tuple's) shape as '(2, 8, 128, 64)'."""
    shape = tuple(getattr(t, "shape", t))
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"

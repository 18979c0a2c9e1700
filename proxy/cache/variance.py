"""Vary (RFC 9111 §4.1): the secondary key that keeps each variant of a response apart.

A stored response remembers the request's values of every field its ``Vary`` names (all
Vary lines, comma-joined lists). A later request may use it only when its own values,
normalised the same way, are equal. Normalising: field lines of one name combined with
", ", and runs of whitespace collapsed, so ``gzip,  br`` and ``gzip, br`` are one variant.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

_WHITESPACE = re.compile(rb"[ \t]+")
_COMMA = re.compile(rb"[ \t]*,[ \t]*")

Variance = tuple[tuple[str, str | None], ...]  # (field name, normalised value or None)


def normalise(values: Sequence[bytes]) -> str | None:
    if not values:
        return None
    joined = b", ".join(value.strip() for value in values)
    return _COMMA.sub(b", ", _WHITESPACE.sub(b" ", joined)).decode("latin-1")


def variance(names: Sequence[str], request_values: Callable[[bytes], Sequence[bytes]]) -> Variance:
    """The request's values for ``names`` (a stored response's Vary list)."""
    return tuple((name, normalise(request_values(name.encode("latin-1")))) for name in names)


def matches(stored: Variance, request_values: Callable[[bytes], Sequence[bytes]]) -> bool:
    return all(normalise(request_values(name.encode("latin-1"))) == value for name, value in stored)


def secondary_key(stored: Variance) -> str:
    """A string that names a variant under its primary key ("" for no Vary)."""
    if not stored:
        return ""
    # An absent field is the bare name, so that it differs from an empty one ("name=").
    return "\x1e".join(name if value is None else f"{name}={value}" for name, value in stored)

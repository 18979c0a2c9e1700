"""Parse the human-friendly units used in the config: durations, sizes and rates.

Each parser takes what YAML hands over (a string, or a plain number) and returns the
canonical value every other module works with: seconds (float), bytes (int), tokens per
second (float). Errors are `ValueError`s with a short message; the config layer adds the
file and location.
"""

from __future__ import annotations

import math
import re

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(rf"^{_NUMBER}\s*(ms|s|m|h)?$")

# Binary (KiB) and decimal (KB) multiples; matched case-insensitively.
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_SIZE_RE = re.compile(rf"^{_NUMBER}\s*([a-z]+)?$", re.IGNORECASE)

_RATE_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE_RE = re.compile(rf"^{_NUMBER}\s*(?:/\s*(s|m|h))?$")


def _plain_number(value: object) -> float | None:
    """A YAML number as a float, or None when `value` is not one (bool is not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value):
        return None
    return float(value)


def parse_duration(value: object) -> float:
    """'250ms', '2s', '1.5s', '1m', '1h' or a plain number of seconds -> seconds."""
    number = _plain_number(value)
    if number is None and isinstance(value, str):
        match = _DURATION_RE.match(value.strip())
        if match:
            number = float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    if number is None or number < 0:
        raise ValueError(f"invalid duration {value!r} (use e.g. 250ms, 2s, 1m)")
    return number


def parse_size(value: object) -> int:
    """'16KiB', '10MiB', '1GiB', '16KB', '512B' or a plain number of bytes -> bytes."""
    number = _plain_number(value)
    if number is None and isinstance(value, str):
        match = _SIZE_RE.match(value.strip())
        if match:
            multiplier = _SIZE_UNITS.get((match.group(2) or "b").lower())
            if multiplier is not None:
                number = float(match.group(1)) * multiplier
    if number is None or number < 0 or not number.is_integer():
        raise ValueError(f"invalid size {value!r} (use e.g. 512B, 16KiB, 10MiB)")
    return int(number)


def parse_rate(value: object) -> float:
    """'100/s', '6000/m', '10/h' -> tokens per second. A bare number is per second."""
    number = _plain_number(value)
    if number is None and isinstance(value, str):
        match = _RATE_RE.match(value.strip())
        if match:
            number = float(match.group(1)) / _RATE_PERIODS[match.group(2) or "s"]
    if number is None or number <= 0:
        raise ValueError(f"invalid rate {value!r} (use e.g. 100/s, 6000/m)")
    return number

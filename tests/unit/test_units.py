"""Durations, sizes and rates as written in the config."""

from __future__ import annotations

import pytest

from proxy.units import parse_duration, parse_rate, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("1.5s", 1.5),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("0s", 0.0),
        (" 30s ", 30.0),
        ("10", 10.0),
        (5, 5.0),
        (0.5, 0.5),
    ],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["abc", "", "2 days", "-1s", -1, "1.5.s", "s", True, None, [1]])
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(ValueError, match=r"^invalid duration .* \(use e\.g\. 250ms, 2s, 1m\)$"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512B", 512),
        ("16KiB", 16 * 1024),
        ("10MiB", 10 * 1024**2),
        ("1GiB", 1024**3),
        ("16KB", 16000),
        ("2MB", 2_000_000),
        ("1GB", 10**9),
        ("1.5KiB", 1536),
        ("16kib", 16 * 1024),
        ("100", 100),
        (4096, 4096),
        (0, 0),
    ],
)
def test_parse_size(text: object, size: int) -> None:
    result = parse_size(text)
    assert result == size
    assert isinstance(result, int)


@pytest.mark.parametrize("text", ["16XB", "1k", "KiB", "-1B", -5, "0.5B", 1.5, False, None])
def test_parse_size_rejects(text: object) -> None:
    with pytest.raises(ValueError, match=r"^invalid size .* \(use e\.g\. 512B, 16KiB, 10MiB\)$"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "per_second"),
    [
        ("100/s", 100.0),
        ("6000/m", 100.0),
        ("10/h", 10 / 3600),
        ("2.5/s", 2.5),
        ("5 / s", 5.0),
        ("20", 20.0),
        (50, 50.0),
    ],
)
def test_parse_rate(text: object, per_second: float) -> None:
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["100/x", "100/", "fast", "0/s", "/s", 0, -1, True, None])
def test_parse_rate_rejects(text: object) -> None:
    with pytest.raises(ValueError, match=r"^invalid rate .* \(use e\.g\. 100/s, 6000/m\)$"):
        parse_rate(text)

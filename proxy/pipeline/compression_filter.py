"""Compression as a response filter: a route's ``compress`` rule applied to the heads that
leave, counted per route. Built once per route when the config loads."""

from __future__ import annotations

from typing import Any

from proxy.pipeline.compress import CompressRule, Encoder, begin_compression


class CompressionFilter:
    __slots__ = ("metrics", "rule")

    def __init__(self, rule: CompressRule, route_metrics: Any) -> None:
        self.rule = rule
        self.metrics = route_metrics

    def encoder_for(self, request: Any, response: Any, length: int | None) -> Encoder | None:
        """The encoder for a response about to leave (its head rewritten in place), or
        None when it goes as it is. ``length``: the body's length when known."""
        encoder, algorithm = begin_compression(self.rule, request, response, length)
        if algorithm is not None:
            self.metrics.compressed(algorithm)
        return encoder

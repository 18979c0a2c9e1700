"""The purge bus's messages: what one process publishes, another decodes."""

from __future__ import annotations

import pytest

from proxy.cache.purgebus import Purge, decode


def test_a_purge_round_trips_with_its_sender():
    purge = Purge("invalidation", ("shop.example/a?x=1", "shop.example/b"))
    assert decode(purge.encode("s1")) == ("s1", purge)
    assert purge.kind == "url"
    assert Purge("tag", ("user-42",)).kind == "tag"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b'{"by": "tag", "values": ["t"]}',
        b'{"from": 1, "by": "tag", "values": ["t"]}',
        b'{"from": "s", "by": "everything", "values": ["t"]}',
        b'{"from": "s", "by": ["tag"], "values": ["t"]}',
        b'{"from": "s", "by": "tag", "values": "t"}',
        b'{"from": "s", "by": "tag", "values": [""]}',
        b'{"from": "s", "by": "tag", "values": [3]}',
        b"\xff\xfe",
    ],
)
def test_a_malformed_message_is_none(data):
    assert decode(data) is None

"""The purge bus's messages: what one process publishes, another decodes."""

from __future__ import annotations

import pytest

from proxy.cache.purgebus import Message, Purge, PurgeBus, decode


def test_a_purge_round_trips_with_its_sender_and_instance():
    purge = Purge("invalidation", ("shop.example/a?x=1", "shop.example/b"))
    assert decode(purge.encode("s1", "i1")) == Message("s1", "i1", purge)
    assert purge.kind == "url"
    assert Purge("tag", ("user-42",)).kind == "tag"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b'{"instance": "i", "by": "tag", "values": ["t"]}',
        b'{"from": "s", "by": "tag", "values": ["t"]}',
        b'{"from": 1, "instance": "i", "by": "tag", "values": ["t"]}',
        b'{"from": "s", "instance": null, "by": "tag", "values": ["t"]}',
        b'{"from": "s", "instance": "i", "by": "everything", "values": ["t"]}',
        b'{"from": "s", "instance": "i", "by": ["tag"], "values": ["t"]}',
        b'{"from": "s", "instance": "i", "by": "tag", "values": "t"}',
        b'{"from": "s", "instance": "i", "by": "tag", "values": [""]}',
        b'{"from": "s", "instance": "i", "by": "tag", "values": [3]}',
        b"\xff\xfe",
    ],
)
def test_a_malformed_message_is_none(data):
    assert decode(data) is None


def test_a_worker_ignores_its_own_messages_and_its_siblings_admin_purges():
    worker = PurgeBus(client=None, subscriber=None, apply=None)
    worker.instance = "host:1:/run/sluicegate-x"
    tag, invalidation = Purge("tag", ("t",)), Purge("invalidation", ("h/a",))
    # Its own: applied when sent.
    assert not worker.concerns_me(Message(worker.sender, worker.instance, tag))
    assert not worker.concerns_me(Message(worker.sender, worker.instance, invalidation))
    # A sibling's admin purge: the supervisor asks this worker too; its invalidation, not.
    assert not worker.concerns_me(Message("sibling", worker.instance, tag))
    assert worker.concerns_me(Message("sibling", worker.instance, invalidation))
    # Another instance's: all of them.
    assert worker.concerns_me(Message("other", "host:2:/run/sluicegate-y", tag))
    assert worker.concerns_me(Message("other", "host:2:/run/sluicegate-y", invalidation))


def test_a_process_without_a_supervisor_is_its_own_instance():
    alone = PurgeBus(client=None, subscriber=None, apply=None)
    assert alone.instance == alone.sender
    assert alone.concerns_me(Message("other", "other", Purge("tag", ("t",))))

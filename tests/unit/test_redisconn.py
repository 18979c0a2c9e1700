"""proxy.redisconn without a server: hash tags, the password's hiding places, the modes."""

from __future__ import annotations

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from proxy import redisconn
from proxy.config import RedisConfig

SECRET = "s3cret-never-shown"


def test_hash_tagged_keys_of_one_bucket_share_a_slot_and_buckets_spread():
    key = redisconn.hash_tagged("sluicegate:rl:", "api:10.0.0.1")
    assert key == "sluicegate:rl:{api:10.0.0.1}"
    assert key_slot(key.encode()) == key_slot(b"api:10.0.0.1")
    assert key_slot(redisconn.hash_tagged("other:", "api:10.0.0.1").encode()) == key_slot(
        key.encode()
    )
    slots = {key_slot(redisconn.hash_tagged("p:", f"api:{i}").encode()) for i in range(50)}
    assert len(slots) > 40


def test_a_brace_in_the_client_key_still_gives_one_slot_per_key():
    key = redisconn.hash_tagged("p:", "api:a}b")
    assert key_slot(key.encode()) == key_slot(key.encode()) == key_slot(b"api:a")


def test_env_password_is_read_at_each_connect_and_absent_means_no_auth(monkeypatch):
    provider = redisconn.EnvPassword("SG_TEST_PW")
    monkeypatch.delenv("SG_TEST_PW", raising=False)
    assert provider.get_credentials() == ()
    monkeypatch.setenv("SG_TEST_PW", SECRET)
    assert provider.get_credentials() == (SECRET,)
    monkeypatch.setenv("SG_TEST_PW", "rotated")
    assert provider.get_credentials() == ("rotated",)
    assert SECRET not in repr(provider)


@pytest.mark.parametrize(
    "options",
    [
        {"url": "redis://10.0.0.1:6379/0"},
        {"mode": "sentinel", "nodes": ["10.0.0.1:26379"], "master": "m", "db": 2},
        {"mode": "cluster", "nodes": ["10.0.0.1:7000", "10.0.0.2:7000"]},
    ],
)
async def test_every_mode_keeps_the_password_out_of_what_can_be_printed(monkeypatch, options):
    monkeypatch.setenv("SG_TEST_PW", SECRET)
    shared = redisconn.connect(RedisConfig(password_env="SG_TEST_PW", timeout=0.05, **options))
    try:
        assert shared.mode == options.get("mode", "single")
        assert shared.cluster == isinstance(shared.client, RedisCluster)
        for text in (shared.where, repr(shared), repr(shared.client), str(vars(shared.client))):
            assert SECRET not in text
    finally:
        await shared.aclose()


async def test_a_password_in_the_url_is_masked_where_it_is_named():
    shared = redisconn.connect(RedisConfig(url=f"redis://:{SECRET}@10.0.0.1:6379/0"))
    try:
        assert shared.where == "redis://:***@10.0.0.1:6379/0"
    finally:
        await shared.aclose()

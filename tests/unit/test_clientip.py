"""Client address: the peer, or the rightmost untrusted X-Forwarded-For hop (trusted peers)."""

from __future__ import annotations

import ipaddress

from proxy.http.clientip import ClientAddressResolver


def resolver(*networks: str) -> ClientAddressResolver:
    return ClientAddressResolver([ipaddress.ip_network(n) for n in networks])


def test_nothing_trusted_gives_the_peer():
    r = resolver()
    assert r.resolve("10.0.0.5", b"1.2.3.4") == "10.0.0.5"
    assert r.resolve("10.0.0.5", None) == "10.0.0.5"


def test_untrusted_peer_cannot_claim_an_address():
    r = resolver("127.0.0.1/32")
    assert r.resolve("10.0.0.5", b"1.2.3.4") == "10.0.0.5"


def test_trusted_peer_without_header_is_the_client():
    r = resolver("127.0.0.1/32")
    assert r.resolve("127.0.0.1", None) == "127.0.0.1"
    assert r.resolve("127.0.0.1", b"") == "127.0.0.1"


def test_rightmost_untrusted_entry_wins():
    r = resolver("127.0.0.1/32", "10.0.0.0/8")
    # a client may forge the leftmost entries; only the hops our proxies added count
    assert r.resolve("127.0.0.1", b"6.6.6.6, 1.2.3.4, 10.1.1.1") == "1.2.3.4"
    assert r.resolve("127.0.0.1", b"1.2.3.4") == "1.2.3.4"
    assert r.resolve("127.0.0.1", b"6.6.6.6,1.2.3.4") == "1.2.3.4"
    assert r.resolve("10.9.9.9", b" 5.6.7.8 ,  10.0.0.1 ") == "5.6.7.8"


def test_all_hops_trusted_gives_the_leftmost():
    r = resolver("127.0.0.1/32", "10.0.0.0/8")
    assert r.resolve("127.0.0.1", b"10.0.0.1, 10.0.0.2") == "10.0.0.1"


def test_empty_entries_are_skipped():
    r = resolver("127.0.0.1/32")
    assert r.resolve("127.0.0.1", b"1.2.3.4, , ") == "1.2.3.4"


def test_ports_are_stripped():
    r = resolver("127.0.0.1/32")
    assert r.resolve("127.0.0.1", b"203.0.113.7:51000") == "203.0.113.7"
    assert r.resolve("127.0.0.1", b"[2001:db8::1]:443") == "2001:db8::1"


def test_ipv6_networks_and_garbage():
    r = resolver("::1/128", "fd00::/8")
    assert r.resolve("::1", b"2001:db8::7, fd00::1") == "2001:db8::7"
    # garbage is not a trusted address, so it is what we report (as nginx does)
    assert r.resolve("::1", b"unknown") == "unknown"
    assert r.resolve("not-an-ip", b"1.2.3.4") == "not-an-ip"

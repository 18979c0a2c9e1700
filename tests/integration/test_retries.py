"""Next-upstream retries through the real daemon, against fault-injecting upstreams.

Each test asserts what the client got and how many requests each backend saw. Servers are
picked round robin in config order, so a fresh daemon sends its first request to the first
server and the retry to the second.
"""

from __future__ import annotations

import concurrent.futures
import socket

import pytest

from tests.support.faulty import (
    access_lines,
    hits,
    lb_config,
    metric_sum,
    refused_port,
    timed_request,
    unanswered_port,
)
from tests.support.rawupstream import read_until_closed


@pytest.mark.parametrize("mode", ["refused", "reset", "close", "reset_head"])
def test_error_before_head_goes_to_next_server(start_sluicegate, fault_server, mode):
    good = fault_server("good")
    if mode == "refused":
        first = f"http://127.0.0.1:{refused_port()}"
        bad = None
    else:
        bad = fault_server("bad", mode)
        first = bad.url
    daemon = start_sluicegate(lb_config([first, good]))

    status, headers, body, _ = timed_request(daemon)

    assert (status, body, headers["x-backend"]) == (200, b"good\n", "good")
    assert good.requests == 1
    if bad is not None:
        assert bad.requests == 1
    (line,) = access_lines(daemon, 1)
    assert line["tries"] == 2
    assert [a["outcome"] for a in line["attempts"]] == ["error", 200]
    assert line["server"] == good.address


def test_timeout_goes_to_next_server(start_sluicegate, fault_server):
    hang, good = fault_server("hang", "hang"), fault_server("good")
    daemon = start_sluicegate(lb_config([hang, good], read="300ms"))

    status, _, body, seconds = timed_request(daemon)

    assert (status, body) == (200, b"good\n")
    assert hits(hang, good) == [1, 1]
    assert 0.3 <= seconds < 2.0
    (line,) = access_lines(daemon, 1)
    assert [a["outcome"] for a in line["attempts"]] == ["timeout", 200]


def test_connect_timeout_goes_to_next_server(start_sluicegate, fault_server):
    good = fault_server("good")
    with unanswered_port() as port:
        silent = f"127.0.0.1:{port}"
        daemon = start_sluicegate(lb_config([f"http://{silent}", good], connect="300ms", read="5s"))

        status, _, body, seconds = timed_request(daemon)

        assert (status, body) == (200, b"good\n")
        assert 0.3 <= seconds < 2.0  # the connect timeout, not the read timeout
        (line,) = access_lines(daemon, 1)
        assert [a["outcome"] for a in line["attempts"]] == ["timeout", 200]
        assert line["server"] == good.address
        metrics = daemon.metrics()
        name = "sluicegate_upstream_requests_total"
        assert metric_sum(metrics, name, server=silent, status="timeout") == 1
        assert metric_sum(metrics, "sluicegate_retries_total", reason="timeout") == 1


def test_connect_timeout_on_the_last_try_is_504(start_sluicegate):
    with unanswered_port() as port:
        daemon = start_sluicegate(lb_config([f"http://127.0.0.1:{port}"], connect="300ms"))

        status, _, body, seconds = timed_request(daemon)

        assert status == 504, body
        assert 0.3 <= seconds < 2.0
        (line,) = access_lines(daemon, 1)
        assert [a["outcome"] for a in line["attempts"]] == ["timeout"]


@pytest.mark.parametrize(
    ("on", "status", "expected_hits"),
    [
        (["error", "timeout"], 502, [1, 0]),
        (["error", "timeout", "invalid_header"], 200, [1, 1]),
    ],
)
def test_invalid_header_retried_only_when_listed(
    start_sluicegate,
    fault_server,
    on,
    status,
    expected_hits,
):
    bad, good = fault_server("bad", "malformed"), fault_server("good")
    daemon = start_sluicegate(lb_config([bad, good], retry={"on": on}))

    got, _, body, _ = timed_request(daemon)

    assert got == status
    assert hits(bad, good) == expected_hits
    if status == 502:
        assert b'"error"' in body  # the proxy's own JSON error
    (line,) = access_lines(daemon, 1)
    assert line["attempts"][0]["outcome"] == "invalid_header"


def test_listed_status_is_retried(start_sluicegate, fault_server):
    bad, good = fault_server("bad", "status", status=503), fault_server("good")
    daemon = start_sluicegate(lb_config([bad, good], retry={"on": ["error", "http_503"]}))

    status, _, body, _ = timed_request(daemon)

    assert (status, body) == (200, b"good\n")
    assert hits(bad, good) == [1, 1]
    assert metric_sum(daemon.metrics(), "sluicegate_retries_total", reason="http_503") == 1


def test_unlisted_status_is_relayed(start_sluicegate, fault_server):
    bad, good = fault_server("bad", "status", status=503), fault_server("good")
    daemon = start_sluicegate(lb_config([bad, good], retry={"on": ["error", "http_502"]}))

    status, headers, body, _ = timed_request(daemon)

    assert (status, body, headers["x-backend"]) == (503, b"bad status 503\n", "bad")
    assert hits(bad, good) == [1, 0]


def test_each_try_on_a_different_server(start_sluicegate, fault_server):
    servers = [fault_server(f"s{i}", "status", status=502) for i in range(3)]
    daemon = start_sluicegate(lb_config(servers, retry={"tries": 5, "on": ["http_502"]}))

    status, _, body, _ = timed_request(daemon)

    # Five tries allowed, three servers: each is tried once, then the last answer stands.
    assert status == 502
    assert body == b"s2 status 502\n"
    assert hits(*servers) == [1, 1, 1]
    (line,) = access_lines(daemon, 1)
    assert line["tries"] == 3
    assert len({a["server"] for a in line["attempts"]}) == 3


def test_tries_caps_the_attempts(start_sluicegate, fault_server):
    servers = [fault_server(f"s{i}", "reset") for i in range(4)]
    daemon = start_sluicegate(lb_config(servers, retry={"tries": 2}))

    status, _, _, _ = timed_request(daemon)

    assert status == 502
    assert hits(*servers) == [1, 1, 0, 0]


def test_retry_timeout_budget_stops_further_tries(start_sluicegate, fault_server):
    servers = [fault_server(f"h{i}", "hang") for i in range(4)]
    config = lb_config(servers, read="300ms", retry={"tries": 4, "timeout": "450ms"})
    daemon = start_sluicegate(config)

    status, _, _, seconds = timed_request(daemon)

    # Try 1 ends at ~0.3s (budget left: retry), try 2 at ~0.6s (budget spent: stop).
    assert status == 504
    assert hits(*servers) == [1, 1, 0, 0]
    assert seconds < 1.5


def test_post_is_not_retried_by_default(start_sluicegate, fault_server):
    bad, good = fault_server("bad", "reset"), fault_server("good")
    daemon = start_sluicegate(lb_config([bad, good]))

    status, _, _, _ = timed_request(daemon, "POST", "/", body=b"payload")

    assert status == 502
    assert hits(bad, good) == [1, 0]


@pytest.mark.parametrize(
    ("on", "with_key", "status", "expected_hits"),
    [
        (["error", "idempotency_key"], True, 200, [1, 1]),
        (["error", "idempotency_key"], False, 502, [1, 0]),
        (["error"], True, 502, [1, 0]),
    ],
    ids=["key-listed", "no-key", "key-not-listed"],
)
def test_post_with_idempotency_key(
    start_sluicegate,
    fault_server,
    on,
    with_key,
    status,
    expected_hits,
):
    bad, good = fault_server("bad", "reset"), fault_server("good")
    daemon = start_sluicegate(lb_config([bad, good], retry={"on": on}))
    headers = {"Idempotency-Key": "order-42"} if with_key else {}

    got, _, _, _ = timed_request(daemon, "POST", "/orders", body=b"{}", headers=headers)

    assert got == status
    assert hits(bad, good) == expected_hits


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_non_idempotent_enables_retry(start_sluicegate, fault_server, method):
    bad, good = fault_server("bad", "reset"), fault_server("good")
    daemon = start_sluicegate(lb_config([bad, good], retry={"on": ["error", "non_idempotent"]}))

    status, _, _, _ = timed_request(daemon, method, "/", body=b"x")

    assert status == 200
    assert hits(bad, good) == [1, 1]
    assert good.methods == [method]


def test_buffered_body_is_replayed_identically(start_sluicegate, fault_server):
    bad, good = fault_server("bad", "reset"), fault_server("good")
    retry = {"on": ["error", "non_idempotent"], "max_body_bytes": "4KiB"}
    daemon = start_sluicegate(lb_config([bad, good], retry=retry))
    payload = bytes(range(256)) * 16  # 4096 bytes: exactly max_body_bytes

    status, _, _, _ = timed_request(daemon, "POST", "/upload", body=payload)

    assert status == 200
    assert hits(bad, good) == [1, 1]
    assert bad.bodies == [payload]
    assert good.bodies == [payload]


def test_body_larger_than_max_body_bytes_is_not_retried(start_sluicegate, fault_server):
    bad, good = fault_server("bad", "reset"), fault_server("good")
    retry = {"on": ["error", "non_idempotent"], "max_body_bytes": "4KiB"}
    daemon = start_sluicegate(lb_config([bad, good], retry=retry))
    payload = b"z" * 4097

    status, _, _, _ = timed_request(daemon, "POST", "/upload", body=payload)

    assert status == 502
    assert hits(bad, good) == [1, 0]
    assert bad.bodies == [payload]  # streamed through in full all the same


def test_large_put_streams_and_is_not_retried(start_sluicegate, fault_server):
    # PUT is idempotent, but a body past max_body_bytes cannot be replayed.
    bad, good = fault_server("bad", "reset"), fault_server("good")
    daemon = start_sluicegate(lb_config([bad, good], retry={"max_body_bytes": "1KiB"}))

    status, _, _, _ = timed_request(daemon, "PUT", "/blob", body=b"p" * 50_000)

    assert status == 502
    assert hits(bad, good) == [1, 0]
    assert bad.bodies == [b"p" * 50_000]


def test_small_put_is_retried(start_sluicegate, fault_server):
    bad, good = fault_server("bad", "reset"), fault_server("good")
    daemon = start_sluicegate(lb_config([bad, good], retry={"max_body_bytes": "1KiB"}))

    status, _, _, _ = timed_request(daemon, "PUT", "/blob", body=b"p" * 1000)

    assert status == 200
    assert hits(bad, good) == [1, 1]
    assert good.bodies == [b"p" * 1000]


def test_never_retried_after_response_bytes_reached_the_client(start_sluicegate, fault_server):
    bad = fault_server("bad", "reset_body", partial=10, body_size=1000)
    good = fault_server("good")
    daemon = start_sluicegate(lb_config([bad, good]))

    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        received, _ = read_until_closed(sock)

    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Content-Length: 1000" in head
    assert body == b"y" * 10  # the connection was cut short of the announced length
    assert hits(bad, good) == [1, 0]
    (line,) = access_lines(daemon, 1)
    assert line["tries"] == 1
    (attempt,) = line["attempts"]  # one attempt, recorded once, with what became of it
    assert (attempt["status"], attempt["outcome"]) == (200, "error")
    metrics = daemon.metrics()
    assert metric_sum(metrics, "sluicegate_upstream_requests_total", server=bad.address) == 1


@pytest.mark.parametrize(
    ("mode", "status"),
    [("reset", 502), ("malformed", 502), ("hang", 504)],
)
def test_tries_run_out_without_a_response(start_sluicegate, fault_server, mode, status):
    servers = [fault_server(f"s{i}", mode) for i in range(2)]
    on = ["error", "timeout", "invalid_header"]
    daemon = start_sluicegate(lb_config(servers, read="300ms", retry={"on": on}))

    got, headers, body, seconds = timed_request(daemon)

    assert got == status
    assert headers["content-type"].startswith("application/json")
    assert b"request_id" in body
    assert hits(*servers) == [1, 1]
    assert seconds < 2.0


def test_tries_run_out_client_gets_last_upstream_response(start_sluicegate, fault_server):
    servers = [fault_server(f"s{i}", "status", status=503) for i in range(3)]
    daemon = start_sluicegate(lb_config(servers, retry={"on": ["http_503"]}))

    status, headers, body, _ = timed_request(daemon)

    assert (status, body, headers["x-backend"]) == (503, b"s2 status 503\n", "s2")
    assert hits(*servers) == [1, 1, 1]


def test_a_response_beats_a_later_connection_error(start_sluicegate, fault_server):
    # The 503 came from a real upstream; the reset after it has no answer to give.
    busy, broken = fault_server("busy", "status", status=503), fault_server("broken", "reset")
    daemon = start_sluicegate(lb_config([busy, broken], retry={"on": ["error", "http_503"]}))

    status, headers, body, _ = timed_request(daemon)

    assert (status, body, headers["x-backend"]) == (503, b"busy status 503\n", "busy")
    assert hits(busy, broken) == [1, 1]


def test_retry_budget_stops_a_retry_storm(start_sluicegate, fault_server):
    servers = [fault_server(f"s{i}", "status", status=503, delay=0.3) for i in range(3)]
    retry = {"tries": 3, "on": ["http_503"], "budget": 0.2}
    daemon = start_sluicegate(lb_config(servers, retry=retry, read="2s"))
    clients = 30

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda _: timed_request(daemon)[0], range(clients)))

    assert results == [503] * clients
    total = sum(hits(*servers))
    retries = metric_sum(daemon.metrics(), "sluicegate_retries_total")
    # Without a budget: 3 tries each = 90 attempts. With it: at most max(3, 0.2 * 30) = 6
    # retries at once, and each retry takes as long as a first try.
    assert clients <= total <= clients + 15, hits(*servers)
    assert retries == total - clients
    assert retries <= 15


def test_recovered_server_takes_traffic_again(start_sluicegate, fault_server):
    flaky, good = fault_server("flaky", "reset"), fault_server("good")
    daemon = start_sluicegate(lb_config([flaky, good]))

    assert timed_request(daemon)[0] == 200  # flaky reset, good answered
    flaky.mode = "ok"
    answers = [timed_request(daemon)[2] for _ in range(4)]

    assert sorted(answers) == [b"flaky\n", b"flaky\n", b"good\n", b"good\n"]
    assert hits(flaky, good) == [3, 3]


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"])
def test_idempotent_methods_are_retried(start_sluicegate, fault_server, method):
    # The good server is a backup: every try goes to the broken primary first.
    bad, good = fault_server("bad", "reset"), fault_server("good")
    daemon = start_sluicegate(lb_config([bad, {"url": good.url, "backup": True}]))

    for _ in range(2):
        status, _, _, _ = timed_request(daemon, method, "/")
        assert status == 200

    assert hits(bad, good) == [2, 2]
    assert good.methods == [method, method]


def test_failed_response_too_large_to_hold_is_still_retried(start_sluicegate, fault_server):
    big = fault_server("big", "status", status=503, body=b"e" * 100_000)
    good = fault_server("good")
    daemon = start_sluicegate(lb_config([big, good], retry={"on": ["http_503"]}))

    status, _, body, _ = timed_request(daemon)

    assert (status, body) == (200, b"good\n")
    assert hits(big, good) == [1, 1]


def test_failed_response_too_large_to_hold_and_no_other_server(start_sluicegate, fault_server):
    # The 503 was read off to try elsewhere; with nowhere else to go it cannot be relayed:
    # a 502 that says why, not a "no eligible server" 503.
    big = fault_server("big", "status", status=503, body=b"e" * 100_000)
    daemon = start_sluicegate(lb_config([big], retry={"on": ["http_503"]}))

    status, _, body, _ = timed_request(daemon)

    assert status == 502
    assert b"too large to hold" in body
    assert hits(big) == [1]

"""A realistic traffic mix against the Sluicegate demo (`sluicegate demo` or the compose stack).

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8080

Mix (by weight): pages (GET /), API writes (POST /echo, small JSON), a slow endpoint
(GET /delay/50), a rate-limited route (GET /limited/, where 429 with Retry-After is the
expected answer once over the limit), and now and then an upstream that fails
(GET /status/503, expected). Expected answers are counted as successes.

At the end, k6-style thresholds are checked and decide the exit code:
p95 latency < 500 ms, failures < 1 % of requests.
"""

from __future__ import annotations

import logging
import random

from locust import HttpUser, between, events, task

P95_LIMIT_MS = 500
MAX_FAIL_RATIO = 0.01


class DemoVisitor(HttpUser):
    wait_time = between(0.05, 0.25)

    @task(10)
    def index(self) -> None:
        self.client.get("/", name="GET /")

    @task(4)
    def post_json(self) -> None:
        payload = {"user": random.randint(1, 10_000), "items": [1, 2, 3], "note": "hello"}
        with self.client.post(
            "/echo", json=payload, name="POST /echo", catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")
                return
            try:
                echoed = response.json()
            except ValueError:
                response.failure("echo did not return JSON")
                return
            if echoed.get("method") != "POST" or echoed.get("body_length", 0) <= 0:
                response.failure("echo lost the request body")

    @task(2)
    def slow(self) -> None:
        self.client.get("/delay/50", name="GET /delay/50 (slow)")

    @task(3)
    def limited(self) -> None:
        with self.client.get(
            "/limited/", name="GET /limited/ (rate limited)", catch_response=True
        ) as response:
            if response.status_code == 429:
                # Expected once over the limit, as long as the client is told when to retry.
                if response.headers.get("Retry-After"):
                    response.success()
                else:
                    response.failure("429 without Retry-After")
            elif response.status_code != 200:
                response.failure(f"status {response.status_code}")

    @task(1)
    def failing_upstream(self) -> None:
        with self.client.get(
            "/status/503", name="GET /status/503 (expected failure)", catch_response=True
        ) as response:
            if response.status_code == 503:
                response.success()
            else:
                response.failure(f"expected the upstream's 503, got {response.status_code}")


@events.quitting.add_listener
def check_thresholds(environment, **_kwargs) -> None:
    """Fail the run (exit code 1) when a threshold is crossed, like k6's thresholds."""
    total = environment.stats.total
    log = logging.getLogger("thresholds")
    if total.num_requests == 0:
        log.error("threshold failed: no requests were made")
        environment.process_exit_code = 1
        return
    p95 = total.get_response_time_percentile(0.95)
    fail_ratio = total.fail_ratio
    verdicts = [
        (f"p95 {p95:.0f} ms < {P95_LIMIT_MS} ms", p95 < P95_LIMIT_MS),
        (f"failures {fail_ratio:.2%} < {MAX_FAIL_RATIO:.0%}", fail_ratio < MAX_FAIL_RATIO),
    ]
    for text, ok in verdicts:
        (log.info if ok else log.error)("threshold %s: %s", "passed" if ok else "FAILED", text)
    environment.process_exit_code = 0 if all(ok for _, ok in verdicts) else 1

"""Instructions per call of each compiled module's per-request work, compiled and as Python.

`make bench-instr` gives the whole request; this isolates what one module adds to it,
including the one `bench-instr` does not exercise (its route has no rate limit). Each
figure is callgrind's count for a process making ``--calls`` calls, minus the count for
the same process making none, divided by ``--calls``: import and start-up cancel out.
The Python figure runs with SLUICEGATE_NO_EXTENSIONS=1 (proxy/compiled.py).

    python loadtests/bench_hot_modules.py [--calls 20000] [--only breaker,stats,bucket]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# name -> (set-up, the calls one request makes)
WORKLOADS = {
    # Per attempt: eligibility, the chosen server's slot, the verdict.
    "breaker": (
        "from proxy.balancing.breaker import CircuitBreaker\nbreaker = CircuitBreaker()",
        "breaker.allows(); breaker.acquire(); breaker.record_success()",
    ),
    # Per attempt, when it ends.
    "stats": (
        "from proxy.observability.stats import RollingStats\nstats = RollingStats()",
        "stats.record(0.003, False)",
    ),
    # Per request on a rate-limited route (in-process buckets): take() and its Decision.
    "bucket": (
        "from proxy.ratelimit.memory import MemoryBackend\nbackend = MemoryBackend()",
        "backend.allow_now('203.0.113.7', 1e9, 1_000_000_000)",
    ),
}


def instructions(setup: str, body: str, calls: int, pure: bool, workdir: Path) -> int:
    script = f"{setup}\nfor _ in range({calls}):\n    {body}\n"
    out = workdir / f"callgrind.{os.getpid()}.{calls}.{int(pure)}"
    env = dict(os.environ)
    env.pop("SLUICEGATE_NO_EXTENSIONS", None)
    if pure:
        env["SLUICEGATE_NO_EXTENSIONS"] = "1"
    subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--quiet",
            f"--callgrind-out-file={out}",
            sys.executable,
            "-c",
            script,
        ],
        env=env,
        cwd=REPO_ROOT,
        check=True,
        timeout=600,
    )
    match = re.search(r"^(?:summary|totals):\s+(\d+)", out.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no totals in {out}")
    return int(match.group(1))


def per_call(name: str, calls: int, pure: bool, workdir: Path) -> float:
    setup, body = WORKLOADS[name]
    busy = instructions(setup, body, calls, pure, workdir)
    idle = instructions(setup, body, 0, pure, workdir)
    return (busy - idle) / calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--only", help="comma-separated: " + ",".join(WORKLOADS))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))
    import proxy

    print(f"compiled here: {', '.join(proxy.COMPILED) or 'nothing'}")
    print("| module | Python | compiled | saved per request |")
    print("|---|---|---|---|")
    names = args.only.split(",") if args.only else list(WORKLOADS)
    with tempfile.TemporaryDirectory(prefix="sg-hot-") as tmp:
        for name in names:
            pure = per_call(name, args.calls, True, Path(tmp))
            built = per_call(name, args.calls, False, Path(tmp))
            print(f"| {name} | {pure:,.0f} | {built:,.0f} | {pure - built:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make bench-instr`: user-space instructions per request, counted by callgrind.

Throughput on a shared machine drifts by tens of percent from one hour to the next, and
Python more than nginx; instruction counts do not. Each proxy runs under
`valgrind --tool=callgrind` (one process: nginx with `master_process off`, Sluicegate with
one worker, the featureless forwarder of loadtests/forwarder.py), in front of the same
origin (outside valgrind). A warm-up fills caches and pools, `callgrind_control --zero`
resets the counters, a fixed number of requests is sent over keep-alive connections,
`callgrind_control --dump` writes the counts, and the total divided by the requests is the
figure. It repeats within about 1 % from run to run whatever else the machine is doing.

    python loadtests/bench_instr.py [--requests 3000] [--connections 10] [--scenario small]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # the origin, configs and process helpers are shared

REPO_ROOT = bench.REPO_ROOT


@dataclass(frozen=True)
class Probe:
    """One measured request kind: its label in the table, path and extra request fields."""

    label: str
    path: str
    headers: str = ""


# Each scenario measures its probes in turn in the same process (a warm-up of each first,
# so the cache-hit probe is answered from the cache), and names the targets it concerns:
# the featureless forwarder neither caches nor compresses.
SCENARIOS: dict[str, tuple[tuple[Probe, ...], tuple[str, ...]]] = {
    "small": ((Probe("small", "/"),), ("nginx", "forwarder", "sluicegate")),
    "64k": ((Probe("64k", "/64k"),), ("nginx", "forwarder", "sluicegate")),
    # A memory-cache hit against the same proxy's proxied small GET (nginx: proxy_cache).
    "cache-hit": (
        (Probe("proxied", "/"), Probe("cache-hit", "/cached/small")),
        ("nginx", "sluicegate"),
    ),
    # 64 KiB of JSON gzipped at bench.GZIP_LEVEL (nginx's default gzip_comp_level).
    "gzip-64k": (
        (Probe("gzip-64k", "/json64k", "Accept-Encoding: gzip\r\n"),),
        ("nginx", "sluicegate"),
    ),
}
CACHE_HIT_BOUND = 0.5  # a hit costs at most half a proxied GET


# --- a fixed-count keep-alive client ----------------------------------------------------


async def _one_connection(probe: Probe, port: int, count: int, statuses: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (
        f"GET {probe.path} HTTP/1.1\r\nHost: bench\r\nUser-Agent: bench-instr\r\n"
        f"{probe.headers}\r\n"
    ).encode()
    try:
        for _ in range(count):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            match = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
            if match:
                await reader.readexactly(int(match.group(1)))
            else:  # chunked: read to the last chunk
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            statuses.append(status)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def drive(port: int, probe: Probe, requests: int, connections: int) -> int:
    """Send exactly ``requests`` GETs; returns how many were answered 200."""
    statuses: list[int] = []
    per_connection = [requests // connections] * connections
    for index in range(requests % connections):
        per_connection[index] += 1

    async def run() -> None:
        await asyncio.gather(
            *(_one_connection(probe, port, n, statuses) for n in per_connection if n)
        )

    asyncio.run(run())
    return sum(1 for status in statuses if status == 200)


# --- callgrind --------------------------------------------------------------------------


def callgrind(cmd: list[str], outdir: Path) -> list[str]:
    return [
        "valgrind",
        "--tool=callgrind",
        "--quiet",
        f"--callgrind-out-file={outdir}/callgrind.out.%p",
        "--dump-instr=no",
        "--trace-children=no",
        *cmd,
    ]


def control(action: str, pid: int) -> None:
    subprocess.run(
        ["callgrind_control", action, str(pid)],
        check=True,
        capture_output=True,
        timeout=120,
    )


def dumped_instructions(outdir: Path, pid: int, before: set[Path]) -> int:
    """The Ir total of the dump made since ``before``."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = sorted(set(outdir.glob(f"callgrind.out.{pid}.*")) - before)
        for path in new:
            text = path.read_text(errors="replace")
            match = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.MULTILINE)
            if match:
                return int(match.group(1))
        time.sleep(0.2)
    raise RuntimeError("callgrind wrote no dump")


def measure(
    name: str,
    cmd: list[str],
    port: int,
    workdir: Path,
    args: argparse.Namespace,
    probes: tuple[Probe, ...],
) -> list[dict]:
    """Each probe's instructions per request, in one process under callgrind."""
    outdir = workdir / f"cg-{name}"
    outdir.mkdir()
    proc = bench.spawn(callgrind(cmd, outdir), workdir / f"{name}.log")
    results = []
    try:
        bench.wait_port(port, proc, name, timeout=300)  # valgrind starts slowly on a busy machine
        for probe in probes:
            drive(port, probe, args.warmup, args.connections)
        for probe in probes:
            before = set(outdir.glob(f"callgrind.out.{proc.pid}.*"))
            control("--zero", proc.pid)
            ok = drive(port, probe, args.requests, args.connections)
            control("--dump", proc.pid)
            total = dumped_instructions(outdir, proc.pid, before)
            if args.keep_dumps is not None:
                args.keep_dumps.mkdir(parents=True, exist_ok=True)
                for dump in set(outdir.glob(f"callgrind.out.{proc.pid}.*")) - before:
                    shutil.copy(dump, args.keep_dumps / f"{name}-{probe.label}.callgrind")
            if ok != args.requests:
                missing = args.requests - ok
                raise RuntimeError(f"{name} {probe.label}: {missing} of {args.requests} not 200")
            results.append(
                {
                    "target": name,
                    "probe": probe.label,
                    "requests": ok,
                    "instructions": total,
                    "per_request": total / ok,
                }
            )
    finally:
        bench.stop_process(proc, timeout=60)
    return results


def targets(
    workdir: Path, origin_port: int, access_log: bool, rate_limited: bool = False
) -> list[tuple[str, list, int]]:
    py = sys.executable
    sg_port, admin_port, fw_port, nginx_port = (bench.free_port() for _ in range(4))
    config = bench.sluicegate_config(sg_port, admin_port, origin_port, None, 1)
    if not access_log:
        config = config.replace("access_log: true", "access_log: false")
    if rate_limited:  # in-process buckets (no Redis), a limit no request reaches
        config += "    rate_limit: {rate: 100000000/s, burst: 100000000, key: client_ip}\n"
    (workdir / "sluicegate.yaml").write_text(config)
    nginx_conf = bench.nginx_config(workdir, nginx_port, origin_port, 1).replace(
        "master_process on;", "master_process off;"
    )
    if not access_log:
        nginx_conf = re.sub(r"access_log [^;]+;", "access_log off;", nginx_conf)
    (workdir / "nginx.conf").write_text(nginx_conf)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return [
        ("nginx", [nginx, "-c", str(workdir / "nginx.conf"), "-p", str(workdir)], nginx_port),
        (
            "forwarder",
            [
                py,
                str(REPO_ROOT / "loadtests" / "forwarder.py"),
                "--listen",
                f"127.0.0.1:{fw_port}",
                "--origin",
                f"127.0.0.1:{origin_port}",
            ],
            fw_port,
        ),
        (
            "sluicegate",
            [py, "-m", "proxy", "run", "-c", str(workdir / "sluicegate.yaml")],
            sg_port,
        ),
    ]


def summary(scenario: str, results: list[dict]) -> list[str]:
    """The table, and the verdict on the scenario's target where it has one."""
    per_request = {(r["target"], r["probe"]): r["per_request"] for r in results}
    lines = []
    if scenario in ("small", "64k"):
        by_name = {target: value for (target, _), value in per_request.items()}
        fw, ng = by_name.get("forwarder"), by_name.get("nginx")
        lines += ["| target | instructions/request | x forwarder | x nginx |", "|---|---|---|---|"]
        for name, value in by_name.items():
            lines.append(
                f"| {name} | {value:,.0f} | {value / fw:.2f} | {value / ng:.2f} |"
                if fw and ng
                else f"| {name} | {value:,.0f} | | |"
            )
        if "sluicegate" in by_name and fw:
            ratio = by_name["sluicegate"] / fw
            verdict = "met" if ratio <= 1.5 else "not met"
            lines.append(
                f"\ntarget: Sluicegate <= 1.5 x the featureless forwarder: {ratio:.2f}x ({verdict})"
            )
        return lines
    lines += ["| target | request | instructions/request |", "|---|---|---|"]
    for (target, probe), value in per_request.items():
        lines.append(f"| {target} | {probe} | {value:,.0f} |")
    if scenario == "cache-hit":
        for target in ("sluicegate", "nginx"):
            hit = per_request.get((target, "cache-hit"))
            proxied = per_request.get((target, "proxied"))
            if hit and proxied:
                lines.append(f"\n{target}: a cache hit costs {hit / proxied:.2f} x a proxied GET")
        hit = per_request.get(("sluicegate", "cache-hit"))
        proxied = per_request.get(("sluicegate", "proxied"))
        if hit and proxied:
            ratio = hit / proxied
            verdict = "met" if ratio <= CACHE_HIT_BOUND else "not met"
            lines.append(
                f"target: a Sluicegate memory-cache hit <= {CACHE_HIT_BOUND} x its proxied"
                f" small GET: {ratio:.2f}x ({verdict})"
            )
    if scenario == "gzip-64k":
        sg = per_request.get(("sluicegate", "gzip-64k"))
        ng = per_request.get(("nginx", "gzip-64k"))
        if sg and ng:
            lines.append(
                f"\ngzip level {bench.GZIP_LEVEL}, 64 KiB JSON: Sluicegate {sg / ng:.2f} x nginx"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=600)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="small")
    parser.add_argument("--no-access-log", action="store_true")
    parser.add_argument(
        "--rate-limited", action="store_true", help="Sluicegate's route has an in-memory limit"
    )
    parser.add_argument("--only", help="comma-separated targets (nginx,forwarder,sluicegate)")
    parser.add_argument(
        "--keep-dumps",
        type=Path,
        help="copy the callgrind dumps here, for callgrind_annotate (one per probe)",
    )
    args = parser.parse_args(argv)
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing: apt-get install valgrind", file=sys.stderr)
            return 1
    probes, concerned = SCENARIOS[args.scenario]
    results = []
    with tempfile.TemporaryDirectory(prefix="sg-instr-") as tmp:
        workdir = Path(tmp)
        origin_port = bench.free_port()
        origin = bench.spawn(
            [sys.executable, str(Path(bench.__file__)), "--origin", str(origin_port)],
            workdir / "origin.log",
        )
        try:
            bench.wait_port(origin_port, origin, "origin")
            chosen = set(args.only.split(",")) if args.only else set(concerned)
            for name, cmd, port in targets(
                workdir, origin_port, not args.no_access_log, args.rate_limited
            ):
                if name in chosen and name in concerned:
                    for result in measure(name, cmd, port, workdir, args, probes):
                        results.append(result)
                        print(
                            f"{name:>11} {result['probe']:>10}: "
                            f"{result['per_request']:>10,.0f} instructions/request"
                        )
        finally:
            bench.stop_process(origin)
    print()
    log = "off" if args.no_access_log else "on"
    print(
        f"scenario {args.scenario}, {args.requests} requests over {args.connections} "
        f"keep-alive connections, access log {log}"
    )
    for line in summary(args.scenario, results):
        print(line)
    out = bench.RESULTS_DIR
    out.mkdir(exist_ok=True)
    (out / f"instr-{args.scenario}.json").write_text(
        json.dumps({"args": vars(args), "results": results}, indent=2, default=str)
    )
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    os._exit(130)

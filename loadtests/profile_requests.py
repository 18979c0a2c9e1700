"""Python-level profile of one Sluicegate worker under a fixed number of requests.

`make bench-instr` says how many instructions a request costs; this says where, in
Python terms. The daemon runs in a child process with two signal handlers: SIGUSR1
starts the profiler after a warm-up, SIGUSR2 stops it and writes the result. Two modes:

- ``bytecodes`` (default): bytecodes executed and calls made per request, by function,
  from an opcode trace. Deterministic: it repeats exactly from run to run.
- ``cprofile``: cProfile's own time per function (wall clock, so noisy on a shared
  machine; ``flow.write`` includes the send system call).

    python loadtests/profile_requests.py [--mode bytecodes|cprofile] [--requests 1000]
        [--path /cached/small]   # a memory-cache hit instead of a proxied GET
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # the origin, configs and process helpers are shared
import bench_instr  # the fixed-count keep-alive client

RUNNER = r"""
import cProfile, collections, json, os, signal, sys
from proxy.control import daemon
from proxy.config import load_config

mode, out = os.environ["PROFILE_MODE"], os.environ["PROFILE_OUT"]
ops, calls = collections.Counter(), collections.Counter()
profile = cProfile.Profile()

def trace(frame, event, arg):
    code = frame.f_code
    key = f"{os.path.basename(code.co_filename)}:{code.co_firstlineno}:{code.co_name}"
    if event == "call":
        calls[key] += 1
        frame.f_trace_opcodes = True
    elif event == "opcode":
        ops[key] += 1
    return trace

def start(*_):
    if mode == "cprofile":
        profile.enable()
    else:
        sys.settrace(trace)

def stop(*_):
    if mode == "cprofile":
        profile.disable()
        profile.dump_stats(out)
    else:
        sys.settrace(None)
        with open(out, "w") as f:
            json.dump({"ops": ops, "calls": calls}, f)

signal.signal(signal.SIGUSR1, start)
signal.signal(signal.SIGUSR2, stop)
daemon.serve(sys.argv[1], load_config(sys.argv[1]))
"""


def profile(args: argparse.Namespace, workdir: Path) -> Path:
    origin_port, port, admin_port = (bench.free_port() for _ in range(3))
    origin = bench.spawn(
        [sys.executable, str(Path(bench.__file__)), "--origin", str(origin_port)],
        workdir / "origin.log",
    )
    config = bench.sluicegate_config(port, admin_port, origin_port, None, 1)
    if args.no_access_log:
        config = config.replace("access_log: true", "access_log: false")
    (workdir / "sluicegate.yaml").write_text(config)
    (workdir / "runner.py").write_text(RUNNER)
    out = workdir / "profile.out"
    env = dict(os.environ, PROFILE_MODE=args.mode, PROFILE_OUT=str(out))
    with open(workdir / "sluicegate.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, str(workdir / "runner.py"), str(workdir / "sluicegate.yaml")],
            cwd=bench.REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        bench.wait_port(origin_port, origin, "origin")
        bench.wait_port(port, proc, "sluicegate")
        probe = bench_instr.Probe(args.path, args.path)
        bench_instr.drive(port, probe, args.warmup, args.connections)
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.3)
        ok = bench_instr.drive(port, probe, args.requests, args.connections)
        time.sleep(0.3)
        proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while not (out.exists() and out.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)  # let the dump finish
    finally:
        bench.stop_process(proc)
        bench.stop_process(origin)
    if ok != args.requests:
        raise RuntimeError(f"{args.requests - ok} of {args.requests} requests not 200")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("bytecodes", "cprofile"), default="bytecodes")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=400)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--no-access-log", action="store_true")
    # /cached/small: after the warm-up every request is a memory-cache hit (bench's origin
    # marks /cached/... cacheable for an hour), the path of `bench-instr --scenario cache-hit`.
    parser.add_argument("--path", default="/", help="what to GET: / proxied, /cached/small hit")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sg-profile-") as tmp:
        out = profile(args, Path(tmp))
        n = args.requests
        if args.mode == "cprofile":
            stats = pstats.Stats(str(out))
            total = sum(entry[1] for entry in stats.stats.values())  # type: ignore[attr-defined]
            print(f"{n} requests: {total / n:.1f} calls per request (C functions included)")
            stats.sort_stats("tottime").print_stats(args.top)
            return 0
        result = json.loads(out.read_text())
    ops, calls = result["ops"], result["calls"]
    print(
        f"{n} requests: {sum(ops.values()) / n:,.0f} bytecodes and "
        f"{sum(calls.values()) / n:.1f} Python calls per request"
    )
    print("| bytecodes/request | calls/request | function |")
    print("|---|---|---|")
    for key, count in sorted(ops.items(), key=lambda item: -item[1])[: args.top]:
        print(f"| {count / n:,.1f} | {calls.get(key, 0) / n:.2f} | {key} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

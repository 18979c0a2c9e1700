"""`sluicegate` command line: the only place that turns errors into messages and exit codes.

Exit codes: 0 clean stop, 1 bad config or startup failure, 2 bad command line (argparse).
User errors print one line each and never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from proxy.errors import ConfigError, StartupError

DEFAULT_CONFIG = "config/sluicegate.yaml"
CONFIG_ENV = "SLUICEGATE_CONFIG"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return exit_code(lambda: args.handler(args))


def exit_code(command: Callable[[], int], who: str = "sluicegate") -> int:
    """Run a command; user errors become messages on stderr and exit 1, never a traceback."""
    try:
        return command()
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 1
    except StartupError as exc:
        print(f"{who}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sluicegate", description="An asyncio Layer-7 reverse-proxy load balancer."
    )
    parser.add_argument(
        "--version",
        action=_VersionAction,
        help="show the version and which modules run compiled, then exit",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the proxy in the foreground")
    run.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help=f"config file (default: ${CONFIG_ENV}, then {DEFAULT_CONFIG})",
    )
    run.add_argument(
        "--watch",
        action="store_true",
        help="reload when the file's content changes, as SIGHUP would (checked every second)",
    )
    run.set_defaults(handler=_run)

    check = commands.add_parser("check", help="validate a config file")
    check.add_argument("-c", "--config", metavar="FILE", required=True, help="config file")
    check.set_defaults(handler=_check)

    demo = commands.add_parser("demo", help="3 demo backends + the proxy on 127.0.0.1:8080")
    demo.set_defaults(handler=_demo)

    backend = commands.add_parser("backend", help="a small demo upstream server")
    backend.add_argument("--port", type=int, required=True, help="port to listen on")
    backend.add_argument("--name", help="name it reports (default: backend-PORT)")
    backend.add_argument("--host", default="127.0.0.1", help="address (default: 127.0.0.1)")
    backend.set_defaults(handler=_backend)
    return parser


def _run(args: argparse.Namespace) -> int:
    from proxy.control.supervisor import (
        run_daemon,  # imported late: the data plane is heavy to load
    )

    return run_daemon(config_path(args.config), watch=args.watch)


def config_path(given: str | None) -> str:
    """The file ``run`` reads: ``-c FILE``, else ``$SLUICEGATE_CONFIG``, else the default,
    which must then exist (a named file that is missing gets the loader's own message)."""
    path = given or os.environ.get(CONFIG_ENV)
    if path:
        return path
    if not os.path.exists(DEFAULT_CONFIG):
        raise StartupError(
            f"no config file: pass -c FILE, set ${CONFIG_ENV}, or create {DEFAULT_CONFIG} here"
            " (`sluicegate demo` runs a ready-made one; the README's Configuration reference"
            " documents every key)"
        )
    return DEFAULT_CONFIG


def _check(args: argparse.Namespace) -> int:
    from proxy.config import load_config

    config = load_config(args.config)
    print(f"OK: {config.summary()}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from proxy.demo.stack import run_demo

    return run_demo()


def _backend(args: argparse.Namespace) -> int:
    from proxy.demo.backend import run_backend

    return run_backend(args.host, args.port, args.name or f"backend-{args.port}")


class _VersionAction(argparse.Action):
    """`--version`, worked out only when asked: it resolves the compiled modules."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        kwargs.update(nargs=0, default=argparse.SUPPRESS)
        super().__init__(option_strings, argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_args: object) -> None:
        print(f"{parser.prog} {_version()} ({_build()})")
        parser.exit()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sluicegate")
    except PackageNotFoundError:
        return "unknown"


def _build() -> str:
    """`compiled: breaker, stats, ...` or `pure Python` (proxy/compiled.py)."""
    import proxy

    if not proxy.COMPILED:
        return "pure Python"
    return "compiled: " + ", ".join(name.removeprefix("proxy.") for name in proxy.COMPILED)

"""One worker process under the supervisor: ``python -m proxy.worker`` (see supervisor.py)."""

from __future__ import annotations

import argparse
import sys

from proxy.config import load_config
from proxy.errors import ConfigError, StartupError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sluicegate-worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--admin-sock", required=True)
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args(argv)
    from proxy.daemon import serve

    try:
        config = load_config(args.config)
        return serve(
            args.config, config, reuse_port=True, admin_sock=args.admin_sock, count_reloads=False
        )
    except ConfigError as error:
        for line in error.errors:
            print(line, file=sys.stderr)
        return 1
    except StartupError as error:
        print(f"sluicegate worker {args.index}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())

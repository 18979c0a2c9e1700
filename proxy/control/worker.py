"""One worker process under the supervisor: ``python -m proxy.control.worker``.

See control/supervisor.py.
"""

from __future__ import annotations

import argparse
import sys

from proxy.cli import exit_code
from proxy.control.watch import ConfigFile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sluicegate-worker")
    parser.add_argument("--config", required=True)  # named in logs and errors
    parser.add_argument("--snapshot", required=True)  # what is loaded: see Supervisor
    parser.add_argument("--admin-sock", required=True)
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args(argv)
    from proxy.control.daemon import serve

    def work() -> int:
        config_file = ConfigFile(args.config, source=args.snapshot)
        config = config_file.load()
        return serve(
            args.config,
            config,
            reuse_port=True,
            admin_sock=args.admin_sock,
            count_reloads=False,
            config_file=config_file,
        )

    return exit_code(work, who=f"sluicegate worker {args.index}")


if __name__ == "__main__":
    sys.exit(main())

"""`python -m proxy` is the `sluicegate` command."""

from proxy.cli import main

raise SystemExit(main())

"""User-facing error types. Only `proxy.cli` turns them into messages and exit codes."""

from __future__ import annotations


class ConfigError(Exception):
    """A config file that cannot be used.

    `errors` holds every problem found, one line each: `{file}: {location}: {message}`.
    """

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class StartupError(Exception):
    """The daemon cannot start (port in use, file missing, ...): a one-line message."""

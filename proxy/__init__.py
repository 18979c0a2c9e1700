"""Sluicegate: an asyncio Layer-7 reverse-proxy load balancer."""

from proxy import compiled as _compiled

__version__ = "0.1.0"

# Before any other module of the package is imported, so the choice covers all of them.
if _compiled.extensions_disabled():
    _compiled.install_pure_python_finder(__name__)


def __getattr__(name: str) -> object:
    # Computed when asked: it resolves the hot modules, which `import proxy` should not.
    if name == "COMPILED":
        return _compiled.compiled_modules()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The compiled hot path: which modules Cython builds, and how to run them as Python.

The modules in ``HOT_MODULES`` are plain Python written in Cython's pure-Python mode
(annotations, ``cython.cclass``, ``cython.cfunc``): ``setup.py`` compiles each into an
extension module beside its ``.py`` when Cython and a C compiler are there, and Python's
import system prefers the extension. Where nothing was compiled the ``.py`` runs as is.

``SLUICEGATE_NO_EXTENSIONS`` set to any non-empty value (as aiohttp's
``AIOHTTP_NO_EXTENSIONS``) runs everything as Python even where extensions sit beside the
sources: ``proxy/__init__.py`` then puts ``PurePythonFinder`` first on ``sys.meta_path``,
which finds this package's modules among ``.py`` files only. Child processes (workers,
the daemons the tests start) inherit the variable, so a whole run is one mode or the
other. At build time the same variable builds no extension at all.

This module is the mechanism, so it is never compiled itself.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

NO_EXTENSIONS_ENV = "SLUICEGATE_NO_EXTENSIONS"

#: Compiled by setup.py when it can. Only per-request objects whose typed form measurably
#: saves instructions belong here: Cython compiling untyped Python makes it slower than
#: CPython 3.11's specialising interpreter, not faster (DESIGN.md has the figures).
#: One name a line, as here: the Makefile reads them to rebuild when one is edited.
HOT_MODULES: tuple[str, ...] = (
    "proxy.balancing.breaker",
    "proxy.balancing.policies",
    "proxy.balancing.retry",
    "proxy.balancing.servers",
    "proxy.cache.hit",
    "proxy.cache.key",
    "proxy.dataplane.client",
    "proxy.dataplane.upstream",
    "proxy.http.pathnorm",
    "proxy.http.request_head",
    "proxy.http.response_head",
    "proxy.observability.accessline",
    "proxy.observability.stats",
    "proxy.pipeline.attempt",
    "proxy.pipeline.exchange",
    "proxy.pipeline.framing",
    "proxy.pipeline.routing",
    "proxy.pipeline.state",
    "proxy.ratelimit.bucket",
)

_PACKAGE_DIR = Path(__file__).resolve().parent


def extensions_disabled(environ: Mapping[str, str] = os.environ) -> bool:
    return bool(environ.get(NO_EXTENSIONS_ENV))


class PurePythonFinder:
    """A meta-path finder that resolves a package's submodules to their ``.py`` files.

    It answers only for names under ``package``; everything else goes on to the normal
    finders. Returning ``None`` for a name it cannot place (a namespace directory, a
    module that exists only compiled) lets the normal machinery decide as usual.
    """

    def __init__(self, package: str) -> None:
        self.package = package
        self._prefix = package + "."
        self._loader_details = (
            importlib.machinery.SourceFileLoader,
            importlib.machinery.SOURCE_SUFFIXES,
        )

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if path is None or not fullname.startswith(self._prefix):
            return None
        for entry in path:
            finder = importlib.machinery.FileFinder(entry, self._loader_details)
            spec = finder.find_spec(fullname)
            if spec is not None and spec.loader is not None:
                return spec
        return None

    def invalidate_caches(self) -> None:
        """Nothing cached: a FileFinder is made per lookup (imports happen once each)."""

    def __repr__(self) -> str:
        return f"<PurePythonFinder {self.package}>"


def install_pure_python_finder(package: str = "proxy") -> PurePythonFinder:
    """Put a ``PurePythonFinder`` for ``package`` first on ``sys.meta_path`` (once)."""
    for finder in sys.meta_path:
        if isinstance(finder, PurePythonFinder) and finder.package == package:
            return finder
    finder = PurePythonFinder(package)
    sys.meta_path.insert(0, finder)
    return finder


def is_compiled(module_name: str) -> bool:
    """Does ``module_name`` run (or, not imported yet, would it run) as an extension?"""
    module = sys.modules.get(module_name)
    spec = module.__spec__ if module is not None else importlib.util.find_spec(module_name)
    return spec is not None and isinstance(spec.loader, importlib.machinery.ExtensionFileLoader)


def compiled_modules() -> tuple[str, ...]:
    """The hot modules that run compiled in this process; ``()`` when all is Python."""
    return tuple(name for name in HOT_MODULES if is_compiled(name))


def stale_extensions(
    modules: Sequence[str] = HOT_MODULES, package_dir: Path = _PACKAGE_DIR
) -> list[str]:
    """Extension files older than what they were built from: the ``.py`` beside them, its
    ``.pxd``, and the ``.pxd`` of each module it cimports. An edit a rebuild has not seen.

    Such a file would run the old code while the source says otherwise; ``make venv``
    (``pip install -e .``) rebuilds it.
    """
    stale = []
    for name in modules:
        source = _module_path(package_dir, name, ".py")
        inputs = [source, _module_path(package_dir, name, ".pxd")]
        inputs += [_module_path(package_dir, other, ".pxd") for other in _cimports(source)]
        newest = max(path.stat().st_mtime for path in inputs if path.exists())
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            built = source.with_suffix(suffix)
            if built.exists() and built.stat().st_mtime < newest:
                stale.append(str(built.relative_to(package_dir.parent)))
    return stale


def _module_path(package_dir: Path, name: str, suffix: str) -> Path:
    return package_dir.joinpath(*name.split(".")[1:]).with_suffix(suffix)


def _cimports(source: Path) -> list[str]:
    """The modules ``source`` cimports (``from cython.cimports.X import ...``)."""
    return re.findall(r"^\s*from cython\.cimports\.([\w.]+) import", source.read_text(), re.M)

"""The build's one dynamic part: the hot modules compiled by Cython when that can be done.

Metadata lives in pyproject.toml. The modules of ``proxy.compiled.HOT_MODULES`` become
extension modules when Cython is importable, a C compiler builds against this Python's
headers, and ``SLUICEGATE_NO_EXTENSIONS`` is not set. Otherwise, or when a module fails to
compile, the install is pure Python with one warning line: never a failed install.
``pip install -e .`` puts the extension modules beside their sources.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import sysconfig
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _load_compiled_module():
    # By path: importing the package itself would need its dependencies at build time.
    spec = importlib.util.spec_from_file_location(
        "_sluicegate_compiled", ROOT / "proxy/compiled.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compiled = _load_compiled_module()


def warn(message: str) -> None:
    print(f"WARNING: sluicegate: {message}; installing pure Python", file=sys.stderr)


def source_of(module: str) -> Path:
    return Path(*module.split(".")).with_suffix(".py")


def remove_built(module: str) -> None:
    """An extension left from an earlier in-place build would shadow the .py: remove it."""
    source = ROOT / source_of(module)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        source.with_suffix(suffix).unlink(missing_ok=True)


def compiler_problem() -> str | None:
    """Why no C extension can be built here, or None when a probe compiles."""
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler

    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp, "probe.c")
        probe.write_text("#include <Python.h>\nint probe(void) { return 0; }\n")
        try:
            compiler = new_compiler()
            customize_compiler(compiler)
            compiler.compile(
                [str(probe)], output_dir=tmp, include_dirs=[sysconfig.get_paths()["include"]]
            )
        except Exception as exc:
            return f"no working C compiler ({str(exc).splitlines()[0] if str(exc) else exc!r})"
    return None


def metadata_only(argv: list[str]) -> bool:
    """pip runs this file for metadata (egg_info, dist_info) before the build itself: only
    the build decides, so that a pure-Python install says so once."""
    return bool({"egg_info", "dist_info"} & set(argv)) and not (
        {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"} & set(argv)
    )


def extensions() -> list[Extension]:
    if metadata_only(sys.argv):
        return []
    if compiled.extensions_disabled():
        reason = f"{compiled.NO_EXTENSIONS_ENV} is set"
    else:
        try:
            from Cython.Build import cythonize
        except ImportError:
            reason = "Cython is not installed"
        else:
            reason = compiler_problem()
    if reason is None:
        try:
            return cythonize(
                [Extension(name, [str(source_of(name))]) for name in compiled.HOT_MODULES],
                compiler_directives={"language_level": 3},
                build_dir="build/cython",  # the generated C stays out of the package
                quiet=True,
            )
        except Exception as exc:  # a Cython error: its own messages are above
            reason = f"Cython failed ({exc})"
    warn(reason)
    for name in compiled.HOT_MODULES:
        remove_built(name)
    return []


class OptionalBuildExt(build_ext):
    """A module that fails to compile stays Python; the others are still compiled."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            warn(f"{ext.name} did not compile ({str(exc).splitlines()[0]})")
            remove_built(ext.name)


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})

"""The compiled hot path: the mode a run is in, forcing pure Python, the cython shim."""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import proxy
from proxy import compiled, cythonshim
from proxy.compiled import HOT_MODULES, PurePythonFinder, stale_extensions

REPO_ROOT = Path(__file__).resolve().parents[2]
EXTENSION_SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def _compiler_present() -> bool:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    return shutil.which(cc) is not None and headers.exists()


def _module_files() -> dict[str, str]:
    return {name: importlib.import_module(name).__file__ for name in HOT_MODULES}


def test_this_run_is_in_the_mode_it_claims() -> None:
    """`make test` runs the suite twice: compiled, then (a subset) with extensions off."""
    files = _module_files()
    if compiled.extensions_disabled():
        assert proxy.COMPILED == ()
        assert all(path.endswith(".py") for path in files.values()), files
    elif _compiler_present():
        # The build compiles every hot module where a compiler works; one missing here
        # means the suite is not testing what ships.
        assert proxy.COMPILED == HOT_MODULES, files
        assert not any(path.endswith(".py") for path in files.values()), files
    else:
        assert proxy.COMPILED == ()


def test_the_variable_forces_pure_python_in_a_fresh_process() -> None:
    script = (
        "import importlib, json, proxy\n"
        "files = {n: importlib.import_module(n).__file__ for n in proxy.compiled.HOT_MODULES}\n"
        "print(json.dumps({'compiled': proxy.COMPILED, 'files': files}))\n"
    )
    env = {**os.environ, "SLUICEGATE_NO_EXTENSIONS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    result = json.loads(out.stdout)
    assert result["compiled"] == []
    assert all(path.endswith(".py") for path in result["files"].values()), result


@pytest.mark.parametrize(("value", "disabled"), [("1", True), ("yes", True), ("", False)])
def test_any_non_empty_value_disables_extensions(value: str, disabled: bool) -> None:
    assert compiled.extensions_disabled({"SLUICEGATE_NO_EXTENSIONS": value}) is disabled
    assert compiled.extensions_disabled({}) is False


@pytest.fixture
def package_with_extensions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A package whose modules each have a broken extension file beside the .py.

    Python's own finders prefer the extension and fail on it, so importing one proves
    which file was chosen.
    """
    name = f"sgfake_{tmp_path.name.replace('-', '_')}"
    root = tmp_path / name
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("")
    for module in (root / "mod", root / "sub" / "deep"):
        module.with_suffix(".py").write_text("WHERE = 'python'\n")
        module.with_name(module.name + EXTENSION_SUFFIX).write_bytes(b"not an ELF file")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[loaded]


def test_without_the_finder_the_extension_beside_the_source_wins(
    package_with_extensions: str,
) -> None:
    with pytest.raises(ImportError):
        importlib.import_module(f"{package_with_extensions}.mod")


def test_the_finder_loads_the_source_beside_an_extension(
    package_with_extensions: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        sys, "meta_path", [PurePythonFinder(package_with_extensions), *sys.meta_path]
    )
    for module in ("mod", "sub.deep"):
        loaded = importlib.import_module(f"{package_with_extensions}.{module}")
        assert loaded.WHERE == "python"
        assert loaded.__file__.endswith(".py")


def test_the_finder_answers_only_for_its_package(tmp_path: Path) -> None:
    finder = PurePythonFinder("proxy")
    assert finder.find_spec("json", None) is None
    assert finder.find_spec("proxyish.mod", [str(tmp_path)]) is None
    assert finder.find_spec("proxy.absent", [str(tmp_path)]) is None


def test_installing_the_finder_twice_keeps_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    first = compiled.install_pure_python_finder("sgfake_twice")
    assert compiled.install_pure_python_finder("sgfake_twice") is first
    assert sys.meta_path[0] is first
    assert [f for f in sys.meta_path if getattr(f, "package", None) == "sgfake_twice"] == [first]


def _cython_names_used(module: str) -> set[str]:
    source = REPO_ROOT.joinpath(*module.split(".")).with_suffix(".py").read_text()
    return {
        node.attr
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "cython"
    }


@pytest.mark.parametrize("module", HOT_MODULES)
def test_the_shim_has_everything_the_hot_modules_use(module: str) -> None:
    missing = {name for name in _cython_names_used(module) if not hasattr(cythonshim, name)}
    assert not missing, f"{module} uses cython.{', cython.'.join(sorted(missing))}"


def test_the_hot_modules_run_without_cython_installed() -> None:
    """An installed wheel has no Cython: run as Python, the modules fall back to the shim."""
    script = (
        "import sys\n"
        "sys.modules['cython'] = None  # as if Cython were not installed\n"
        "import importlib, proxy\n"
        "for name in proxy.compiled.HOT_MODULES:\n"
        "    module = importlib.import_module(name)\n"
        "    assert module.__file__.endswith('.py'), module.__file__\n"
        "from proxy.balancing.breaker import CircuitBreaker\n"
        "from proxy.observability.stats import RollingStats\n"
        "from proxy.ratelimit.bucket import take\n"
        "breaker = CircuitBreaker(failure_threshold=1, clock=lambda: 0.0)\n"
        "breaker.record_failure()\n"
        "assert not breaker.allows()\n"
        "stats = RollingStats(clock=lambda: 5.0)\n"
        "stats.record(0.01, False)\n"
        "assert stats.snapshot()['error_rate'] == 0.0\n"
        "assert take(10.0, 0.0, 1.0, 1.0, 10)[0].allowed\n"
    )
    env = {**os.environ, "SLUICEGATE_NO_EXTENSIONS": "1"}
    subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO_ROOT, check=True, timeout=60)


@pytest.mark.parametrize("pure", [False, True])
def test_version_says_which_modules_run_compiled(pure: bool) -> None:
    env = dict(os.environ)
    env.pop("SLUICEGATE_NO_EXTENSIONS", None)
    if pure:
        env["SLUICEGATE_NO_EXTENSIONS"] = "1"
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "--version"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    if pure or not _compiler_present():
        assert out.endswith(" (pure Python)\n"), out
    else:
        listed = ", ".join(name.removeprefix("proxy.") for name in HOT_MODULES)
        assert out.endswith(f" (compiled: {listed})\n"), out


def test_an_extension_is_stale_after_an_edit_to_its_source_or_a_pxd_it_cimports(tmp_path):
    """A ``.pxd`` is part of what an extension is built from: its own, and the one of each
    module it cimports (the cache's hit reads the exchange's C fields through it)."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("x = 1\n")
    (package / "a.pxd").write_text("cdef class A:\n    pass\n")
    (package / "b.py").write_text("if cython.compiled:\n    from cython.cimports.pkg.a import A\n")
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    built = {name: package / f"{name}{suffix}" for name in ("a", "b")}
    for path in built.values():
        path.write_bytes(b"")
    modules = ("pkg.a", "pkg.b")

    def age_all(seconds: float) -> None:
        for path in package.iterdir():
            os.utime(path, (seconds, seconds))

    age_all(1_000.0)
    assert stale_extensions(modules, package) == []
    os.utime(package / "a.pxd", (2_000.0, 2_000.0))  # the declarations b cimports
    assert stale_extensions(modules, package) == [f"pkg/a{suffix}", f"pkg/b{suffix}"]
    age_all(1_000.0)
    os.utime(package / "b.py", (2_000.0, 2_000.0))
    assert stale_extensions(modules, package) == [f"pkg/b{suffix}"]

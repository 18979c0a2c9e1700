"""setup.py: where nothing can be compiled, a pure-Python install with one warning line.

`setup.py build` runs in a copy of the project, in this environment (which has no
Cython unless someone installed it), so no network is needed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.compiled import HOT_MODULES

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "project"
    copy.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO_ROOT / name, copy / name)
    shutil.copytree(
        REPO_ROOT / "proxy", copy / "proxy", ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    # An extension left by an earlier build beside a source must not survive a pure build.
    (copy / "proxy" / "balancing" / "breaker.cpython-311-x86_64-linux-gnu.so").write_bytes(b"stale")
    return copy


def build(project: Path, **env: str) -> tuple[Path, str]:
    """`setup.py build` into project/out; returns the built tree and the build's output."""
    result = subprocess.run(
        [sys.executable, "setup.py", "build", "--build-base", "out"],
        cwd=project,
        # The pure test run sets the variable: each test here chooses it for itself.
        env={**{k: v for k, v in os.environ.items() if k != "SLUICEGATE_NO_EXTENSIONS"}, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return project / "out", result.stdout + result.stderr


def assert_pure(built: Path, project: Path) -> None:
    (lib,) = built.glob("lib*")
    for module in HOT_MODULES:
        assert (lib / module.replace(".", "/")).with_suffix(".py").exists()
    assert not list(project.rglob("*.so")), "an extension was built or left behind"


def _warnings(output: str) -> list[str]:
    return [line for line in output.splitlines() if "WARNING: sluicegate:" in line]


@pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import Cython"], capture_output=True).returncode == 0,
    reason="this environment has Cython: the no-Cython path cannot be seen here",
)
def test_without_cython_the_install_is_pure_python(project_copy: Path) -> None:
    built, output = build(project_copy)
    assert_pure(built, project_copy)
    (warning,) = _warnings(output)
    assert "Cython is not installed; installing pure Python" in warning


def test_the_variable_builds_no_extension(project_copy: Path) -> None:
    built, output = build(project_copy, SLUICEGATE_NO_EXTENSIONS="1")
    assert_pure(built, project_copy)
    (warning,) = _warnings(output)
    assert "SLUICEGATE_NO_EXTENSIONS is set; installing pure Python" in warning

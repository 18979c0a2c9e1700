"""What ships: the repository stands on its own, and an installed wheel runs from anywhere.

The wheel is built from a copy of exactly what the Dockerfile builds from (pyproject.toml,
README.md, proxy/), so nothing outside the package can leak in, with the build backend of
the dev extra (no build isolation, no index: offline). It is installed into a fresh venv
whose only other packages are this venv's, put on its path by a .pth file (the dependencies,
without downloading them); a .pth-added directory's own .pth files are not run, so the
editable install of the checkout stays invisible there. Then ``sluicegate demo`` runs from
an empty directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.support.demo import (
    ADMIN,
    PROXY,
    busy_demo_ports,
    get,
    wait_for_demo_ports_free,
    wait_until_demo_serves,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

# Paths that lead out of a clone: the workspace the project was written in. Spelled in
# pieces so that this file does not name them itself.
OUTSIDE = ("../" + "shared", "/work" + "/shared", "/work" + "/wt")


def _tracked_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True, timeout=30
    ).stdout
    return [REPO_ROOT / name for name in listed.decode().split("\0") if name]


def test_repository_names_no_file_outside_itself():
    offenders = []
    for path in _tracked_files():
        if not path.is_file():  # deleted in the work tree, not yet committed
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if any(outside in line for outside in OUTSIDE):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert not offenders, "files outside the repository named:\n" + "\n".join(offenders)


def test_the_contract_is_carried_in_the_repository():
    spec = REPO_ROOT / "docs" / "SPEC.md"
    assert "## Command line" in spec.read_text()
    assert "docs/SPEC.md" in (REPO_ROOT / "DESIGN.md").read_text()


# -- the wheel ---------------------------------------------------------------------------------


class InstalledWheel:
    def __init__(self, wheel: Path, venv: Path) -> None:
        self.wheel = wheel
        self.venv = venv
        self.python = venv / "bin" / "python"
        self.sluicegate = venv / "bin" / "sluicegate"


def _build_wheel(work: Path) -> Path:
    source = work / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(
        REPO_ROOT / "proxy", source / "proxy", ignore=shutil.ignore_patterns("__pycache__")
    )
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-q", "-w", str(work / "dist"), str(source)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    hint = "(the build backend is the dev extra's setuptools: make venv)"
    assert built.returncode == 0, f"{built.stderr}\n{hint}"
    [wheel] = (work / "dist").glob("sluicegate-*.whl")
    return wheel


def _install(wheel: Path, venv: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60
    )
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.strip()  # fmt: skip
    Path(purelib, "dependencies-from-the-test-venv.pth").write_text(
        sysconfig.get_path("purelib") + "\n"
    )
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "--disable-pip-version-check", "-q", str(wheel)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> InstalledWheel:
    work = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(work)
    _install(wheel, work / "venv")
    return InstalledWheel(wheel, work / "venv")


def _clean_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.pop("SLUICEGATE_CONFIG", None)
    return env


@pytest.mark.slow  # builds and installs the wheel (module fixture)
def test_wheel_carries_the_demo_config_and_the_status_page(installed_wheel: InstalledWheel):
    names = set(zipfile.ZipFile(installed_wheel.wheel).namelist())
    assert {
        "proxy/demo/demo.yaml",
        "proxy/control/static/status.html",
        "proxy/ratelimit/token_bucket.lua",
    } <= names
    # One source of truth: config/demo.yaml is the packaged file, not a copy that can drift.
    packaged = REPO_ROOT / "proxy" / "demo" / "demo.yaml"
    assert (REPO_ROOT / "config" / "demo.yaml").resolve() == packaged


@pytest.mark.slow  # builds and installs the wheel (module fixture)
def test_installed_run_without_a_config_says_how_to_get_one(
    installed_wheel: InstalledWheel, tmp_path: Path
):
    result = subprocess.run(
        [str(installed_wheel.sluicegate), "run"],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("sluicegate: no config file: pass -c FILE, set $SLUICEGATE_CONFIG")
    assert "sluicegate demo" in line


@pytest.mark.slow
def test_installed_wheel_runs_the_demo_from_any_directory(
    installed_wheel: InstalledWheel, tmp_path: Path
):
    where = subprocess.run(
        [str(installed_wheel.python), "-c", "import proxy; print(proxy.__file__)"],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert where.startswith(str(installed_wheel.venv)), f"imported from the checkout: {where}"
    wait_for_demo_ports_free()
    demo = subprocess.Popen(
        [str(installed_wheel.sluicegate), "demo"],
        cwd=tmp_path, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_until_demo_serves(demo)
        status, headers, _ = get(f"{PROXY}/")
        assert status == 200 and headers["X-Backend"].startswith("backend-808")
        status, headers, page = get(f"{ADMIN}/")
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert b"<html" in page.lower()
    finally:
        demo.send_signal(signal.SIGINT)
        output, _ = demo.communicate(timeout=20)
    assert demo.returncode == 0, output
    assert "Traceback" not in output
    assert not busy_demo_ports(), "something of the demo is left"

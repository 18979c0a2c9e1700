"""`sluicegate check` run as a real subprocess, the way users and CI run it."""

from __future__ import annotations

import re
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CASES = REPO / "tests" / "unit" / "config_cases"


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in result.stdout + result.stderr
    return result


def test_check_example_config_prints_ok() -> None:
    result = _run("check", "-c", "config/sluicegate.yaml")
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        "OK: 2 routes, 1 upstream, 3 servers\n",
        "",
    )


def test_readme_shows_what_check_prints_for_the_shipped_example() -> None:
    shown = re.findall(
        r"`sluicegate check -c config/sluicegate.yaml` prints `(OK: [^`]*)`",
        (REPO / "README.md").read_text(),
    )
    assert len(shown) == 1, "README: the example line of `sluicegate check` is missing"
    result = _run("check", "-c", "config/sluicegate.yaml")
    assert result.stdout == f"{shown[0]}\n"


def test_check_demo_config_prints_ok() -> None:
    result = _run("check", "-c", "config/demo.yaml")
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        "OK: 3 routes, 1 upstream, 3 servers\n",
        "",
    )


def test_check_bad_file_prints_every_error_line_and_exits_1() -> None:
    path = CASES / "several_errors.yaml"
    expected = [
        f"{path}: {line.removeprefix('# expect: ')}"
        for line in path.read_text().splitlines()
        if line.startswith("# expect: ")
    ]
    result = _run("check", "-c", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == expected
    assert len(expected) == 6


def test_check_missing_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    result = _run("check", "-c", str(path))
    assert result.returncode == 1
    assert result.stderr == f"{path}: cannot read config file: No such file or directory\n"


def test_check_yaml_syntax_error_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("routes:\n  - name: [unclosed\n")
    result = _run("check", "-c", str(path))
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{path}: line ")
    assert "invalid YAML" in line


def test_check_directory_instead_of_file(tmp_path: Path) -> None:
    result = _run("check", "-c", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr == f"{tmp_path}: cannot read config file: Is a directory\n"


def test_check_without_file_is_a_usage_error() -> None:
    result = _run("check")
    assert result.returncode == 2
    assert "-c" in result.stderr


def test_no_command_prints_usage() -> None:
    result = _run()
    assert result.returncode == 2
    assert "usage: sluicegate" in result.stderr


# In-process: how cli.main turns the daemon's outcomes into messages and exit codes.


def _fake_daemon(monkeypatch: pytest.MonkeyPatch, behaviour: Callable[[], int]) -> list[str]:
    """Stand in for proxy.control.supervisor's run_daemon (the real one binds ports)."""
    calls: list[str] = []

    def run_daemon(path: str, *, watch: bool = False) -> int:
        calls.append(f"{path} --watch" if watch else path)
        return behaviour()

    module = types.ModuleType("proxy.control.supervisor")
    module.run_daemon = run_daemon  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "proxy.control.supervisor", module)
    return calls


def test_run_config_path_defaults_to_env_then_example(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.cli import main

    calls = _fake_daemon(monkeypatch, lambda: 0)
    monkeypatch.delenv("SLUICEGATE_CONFIG", raising=False)
    monkeypatch.chdir(REPO)  # where config/sluicegate.yaml is
    assert main(["run"]) == 0
    monkeypatch.setenv("SLUICEGATE_CONFIG", "/etc/sg.yaml")
    assert main(["run"]) == 0
    assert main(["run", "-c", "mine.yaml"]) == 0
    assert main(["run", "-c", "mine.yaml", "--watch"]) == 0
    assert calls == ["config/sluicegate.yaml", "/etc/sg.yaml", "mine.yaml", "mine.yaml --watch"]


def test_run_without_any_config_says_in_one_line_how_to_get_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from proxy.cli import main

    calls = _fake_daemon(monkeypatch, lambda: 0)
    monkeypatch.delenv("SLUICEGATE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["run"]) == 1
    assert calls == []
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(
        "sluicegate: no config file: pass -c FILE, set $SLUICEGATE_CONFIG,"
        " or create config/sluicegate.yaml here (`sluicegate demo` runs a ready-made one"
    )


def test_startup_error_is_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from proxy.cli import main
    from proxy.errors import StartupError

    def fail() -> int:
        raise StartupError("cannot listen on 0.0.0.0:8080: address already in use")

    _fake_daemon(monkeypatch, fail)
    assert main(["run"]) == 1
    assert capsys.readouterr().err == (
        "sluicegate: cannot listen on 0.0.0.0:8080: address already in use\n"
    )


def test_config_error_from_run_prints_each_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from proxy.cli import main
    from proxy.config import ConfigError

    def fail() -> int:
        raise ConfigError(["c.yaml: workers: must be >= 0 (got -1)", "c.yaml: routes: required"])

    _fake_daemon(monkeypatch, fail)
    assert main(["run", "-c", "c.yaml"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "c.yaml: workers: must be >= 0 (got -1)",
        "c.yaml: routes: required",
    ]


def test_ctrl_c_is_a_clean_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.cli import main

    def interrupt() -> int:
        raise KeyboardInterrupt

    _fake_daemon(monkeypatch, interrupt)
    assert main(["run"]) == 0

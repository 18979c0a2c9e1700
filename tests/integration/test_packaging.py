"""What ships: the repository stands on its own, and an installed wheel runs from anywhere."""

from __future__ import annotations

import subprocess
from pathlib import Path

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

"""The docs gate is strict: the build scripts/test.sh runs fails on a warning.

(`mkdocs build --strict --quiet` passes with warnings: --quiet drops them before strict
mode counts them. This checks the command CI really runs.)
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("mkdocs") is None, reason="needs the docs extra (mkdocs)")
def test_a_broken_link_fails_the_docs_build(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    page = tmp_path / "docs" / "index.md"
    page.write_text(page.read_text() + "\n[a page that is not there](missing.md)\n")
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build_docs.sh"), str(tmp_path / "site"),
         str(tmp_path / "mkdocs.yml")],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode != 0
    assert "missing.md" in result.stdout + result.stderr

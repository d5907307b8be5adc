"""What `pip install stableopt` ships: the package, and nothing of the benchmarks."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """A wheel built from a clean copy of the source tree (no stale build/ folder)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "site"),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp / "dist"), str(source)],
        check=True,
    )  # fmt: skip
    (built,) = (tmp / "dist").glob("stableopt-*.whl")
    return zipfile.ZipFile(built)


def test_the_wheel_ships_no_benchmark_code(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    packages = {name.split("/")[0] for name in names}
    assert "benchmarks" not in packages
    assert not [name for name in names if "bench" in name.lower()]
    assert "stableopt/testing/faults.py" in names  # the fault-injection helpers stay importable


def test_the_wheel_pulls_no_benchmark_dependency(wheel: zipfile.ZipFile) -> None:
    (metadata,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    text = wheel.read(metadata).decode()
    required = [
        line.split(":", 1)[1].strip()
        for line in text.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    assert sorted(r.split(">")[0].split("=")[0] for r in required) == ["numpy", "scipy", "torch"]
    assert "ai2-olmo-core" not in text and "Provides-Extra: bench" not in text


def test_importing_the_package_pulls_in_no_compiler_and_no_scipy() -> None:
    """What made `import stableopt` cost 2-3x `import torch`: torch._dynamo (pulled in by
    torch.compiler.disable at import) and scipy.stats. Both are imported when first used."""
    code = (
        "import sys, stableopt, stableopt.cli\n"
        "heavy = [m for m in ('torch._dynamo', 'scipy', 'scipy.stats', 'matplotlib') "
        "if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == ""


def test_the_wheel_says_what_it_is_and_that_it_is_typed(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    assert "stableopt/py.typed" in names  # PEP 561: type checkers read our annotations
    (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    metadata = wheel.read(metadata_name).decode()
    fields: dict[str, list[str]] = {}
    for line in metadata.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(": ")
        fields.setdefault(key, []).append(value)
    assert fields["Summary"][0].startswith("A drop-in PyTorch optimizer wrapper")
    assert "Apache-2.0" in (fields.get("License", []) + fields.get("License-Expression", []))
    assert fields["Author"] == ["The stableopt developers"]
    urls = dict(u.split(", ", 1) for u in fields["Project-URL"])
    assert {"Homepage", "Repository", "Documentation", "Issues"} <= urls.keys()
    classifiers = fields["Classifier"]
    assert "Typing :: Typed" in classifiers
    assert {
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
    } <= set(classifiers)
    assert fields["Requires-Python"] == [">=3.10"]

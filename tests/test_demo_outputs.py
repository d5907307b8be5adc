"""``stableopt demo --log-dir`` says where each output went, or which it skipped and how to get it;
MLflow's own INFO lines stay off the console."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def run_demo(log_dir: Path, block: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """The CLI in a fresh interpreter; the modules in ``block`` cannot be imported there."""
    code = (
        "import sys\n"
        f"for name in {list(block)!r}: sys.modules[name] = None\n"
        "from stableopt.cli import main\n"
        f"sys.exit(main(['demo', '--steps', '20', '--log-dir', {str(log_dir)!r}]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=ENV,
    )


def outputs(stdout: str) -> dict[str, str]:
    """The ``outputs of the SafeOptimizer run:`` block, label -> the rest of the line."""
    lines = stdout.split("outputs of the SafeOptimizer run:\n", 1)[1].splitlines()
    found = {}
    for line in lines:
        if not line.startswith("  "):
            break
        label, _, rest = line.strip().partition("  ")
        found[label] = rest.strip()
    return found


def test_the_demo_says_where_it_wrote_each_output(tmp_path: Path) -> None:
    for module in ("mlflow", "tensorboard", "matplotlib"):
        pytest.importorskip(module)
    log_dir = tmp_path / "demo"
    proc = run_demo(log_dir)
    assert proc.returncode == 0, proc.stderr
    written = outputs(proc.stdout)
    assert written["run log"] == str(log_dir / "run.jsonl")
    store = (log_dir / "mlflow.db").resolve().as_posix()
    assert written["MLflow store"] == (
        f"{log_dir / 'mlflow.db'} (mlflow ui --backend-store-uri sqlite:///{store})"
    )
    events = log_dir / "tensorboard"
    assert written["TensorBoard log"] == f"{events} (tensorboard --logdir {events})"
    assert written["report"] == str(log_dir / "run.png")
    assert all(not value.startswith("skipped") for value in written.values())
    assert (log_dir / "run.jsonl").stat().st_size > 0
    assert (log_dir / "mlflow.db").stat().st_size > 0
    assert any(events.rglob("events.out.tfevents.*"))
    assert (log_dir / "run.png").stat().st_size > 20_000
    console = proc.stdout + proc.stderr
    assert "INFO mlflow" not in console and "database tables" not in console


def test_the_demo_names_each_skipped_output_and_its_install_command(tmp_path: Path) -> None:
    log_dir = tmp_path / "demo"
    blocked = ("mlflow", "torch.utils.tensorboard", "matplotlib", "matplotlib.figure")
    proc = run_demo(log_dir, block=blocked)
    assert proc.returncode == 0, proc.stderr
    written = outputs(proc.stdout)
    assert written["run log"] == str(log_dir / "run.jsonl")
    assert written["MLflow store"].startswith("skipped: ")
    assert "pip install 'stableopt[mlflow]'" in written["MLflow store"]
    assert written["TensorBoard log"].startswith("skipped: ")
    assert "pip install 'stableopt[tensorboard]'" in written["TensorBoard log"]
    assert written["report (run.png)"].startswith("skipped: ")
    assert "pip install 'stableopt[plot]'" in written["report (run.png)"]
    assert sorted(p.name for p in log_dir.iterdir()) == ["run.jsonl"]


def test_the_mlflow_sink_leaves_mlflows_logger_as_it_found_it(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from stableopt.sinks import MLflowSink

    logger = logging.getLogger("mlflow")
    original = logger.level
    try:
        for level in (logging.NOTSET, logging.DEBUG, logging.ERROR):
            logger.setLevel(level)
            sink = MLflowSink(
                f"sqlite:///{(tmp_path / f'{level}.db').as_posix()}",
                artifact_location=(tmp_path / "artifacts").as_uri(),
            )
            assert logger.level == level
            sink.close()
            assert logger.level == level
    finally:
        logger.setLevel(original)

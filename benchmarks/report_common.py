"""What every benchmark report's header says: the command, the machine, the versions."""

from __future__ import annotations

import os
import platform

import torch

__all__ = ["machine_lines", "matplotlib_pyplot"]


def machine_lines(command: str, seconds: float, jobs: int, threads: int) -> list[str]:
    """The header bullet lines: command, run time, machine, versions."""
    return [
        f"- command: `{command}`",
        f"- run time: {seconds:.0f} s ({jobs} worker process(es), {threads} torch thread(s) each)",
        f"- machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count() or 0} CPU cores (shared with other jobs while this ran)",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
    ]


def matplotlib_pyplot() -> object | None:
    """``matplotlib.pyplot`` with the Agg backend, or ``None`` when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt

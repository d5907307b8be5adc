"""How long `import stableopt` takes against `import torch`, each in a fresh interpreter.

Runs the commands interleaved (torch, stableopt, the CLI's --help, in turn), several rounds,
and reports medians and the ratio; writes results/import-time.md. Usage:

    python scripts/import_time.py [--rounds 15] [--out results]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "import stableopt": [sys.executable, "-c", "import stableopt"],
    "python -m stableopt --help": [sys.executable, "-m", "stableopt", "--help"],
}


def measure(rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for command in COMMANDS.values():  # warm the file cache once
        subprocess.run(command, check=True, capture_output=True)
    for _ in range(rounds):
        for name, command in COMMANDS.items():
            started = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            times[name].append(time.perf_counter() - started)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default="results")
    args = parser.parse_args()
    times = measure(args.rounds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["import torch"]
    import torch

    lines = [
        "# Import time",
        "",
        f"Command: `python scripts/import_time.py --rounds {args.rounds}`; each line a fresh "
        f"interpreter, the three run in turn, {args.rounds} rounds, medians.",
        f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, Python "
        f"{platform.python_version()}, torch {torch.__version__}.",
        "",
        "| command | median (s) | ratio to `import torch` |",
        "|---|---:|---:|",
    ]
    for name, median in medians.items():
        lines.append(f"| `{name}` | {median:.3f} | {median / base:.2f}x |")
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "import-time.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

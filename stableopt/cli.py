"""The ``stableopt`` command: ``python -m stableopt demo``, ``report``, ``bench``.

Every subcommand is one ``_add_<name>(subparsers, common)`` function that adds
its parser and sets ``handler`` to the function that runs it; :func:`main` parses,
configures logging once and calls the handler. Heavy imports happen inside the
handlers, so ``stableopt --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import stableopt

__all__ = ["build_parser", "main"]

_Subparsers = Any  # argparse's _SubParsersAction is private


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be an integer >= {minimum}, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def _add_demo(subparsers: _Subparsers, common: argparse.ArgumentParser) -> None:
    from stableopt.demo import MIN_STEPS

    parser = subparsers.add_parser(
        "demo",
        parents=[common],
        help="plain AdamW vs SafeOptimizer(AdamW) under injected faults",
        description=(
            "Train a small MLP regression with plain AdamW and with SafeOptimizer(AdamW) on the "
            "same seed, data order and faults (NaN gradients, an Inf loss, a 1e5x gradient spike, "
            "an update that leaves NaN weights), and print what each run went through."
        ),
    )
    parser.add_argument(
        "--steps", type=_int_at_least(MIN_STEPS), default=300, help="training steps (default 300)"
    )
    parser.add_argument(
        "--seed",
        type=_int_at_least(0),
        default=0,
        help="seed of model, data and faults (default 0)",
    )
    parser.add_argument(
        "--log-dir",
        default=None,
        help="also log the SafeOptimizer run there: run.jsonl, an MLflow store, TensorBoard "
        "events (as installed), and run.png drawn from run.jsonl",
    )
    parser.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    import torch

    from stableopt.demo import format_report, run_demo

    # The demo's MLP is tiny: intra-op threads cost more than they save (about 2x
    # slower on 2 busy cores), and this process is ours to configure.
    torch.set_num_threads(1)
    started = time.perf_counter()
    result = run_demo(steps=args.steps, seed=args.seed, log_dir=args.log_dir)
    print(format_report(result))
    print(f"\n({time.perf_counter() - started:.1f} s)")
    # A demo in which SafeOptimizer did not survive is a failure of the library.
    return 0 if result.method("SafeOptimizer").is_finite else 1


def _add_bench(subparsers: _Subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "bench",
        add_help=False,  # --help goes to the benchmark command's own parser
        help="benchmarks (from a source checkout): stability under faults, --perf, ...",
        description="Run the benchmarks of benchmarks/ in the source checkout.",
    )
    parser.set_defaults(handler=_run_bench)


def _run_bench(bench_args: Sequence[str]) -> int:
    """Hand the arguments to ``benchmarks.cli``: the benchmarks are not installed with the
    package; they live in the source checkout next to it."""
    try:
        from benchmarks.cli import main as bench_main
    except ImportError:
        checkout = Path(stableopt.__file__).resolve().parents[1]
        if not (checkout / "benchmarks" / "cli.py").is_file():
            print(
                "stableopt bench: the benchmarks are not installed with the package; run this "
                "command from a source checkout (git clone the repository, then "
                "`pip install -e . -r benchmarks/requirements.txt`)",
                file=sys.stderr,
            )
            return 2
        sys.path.insert(0, str(checkout))
        from benchmarks.cli import main as bench_main
    return int(bench_main(list(bench_args)))


def _add_report(subparsers: _Subparsers, common: argparse.ArgumentParser) -> None:
    from stableopt import report

    parser = subparsers.add_parser(
        "report", parents=[common], help="draw a run log (run.jsonl) as a PNG"
    )
    report.build_parser(parser).set_defaults(handler=report.run)


_SUBCOMMANDS: tuple[Callable[[_Subparsers, argparse.ArgumentParser], None], ...] = (
    _add_demo,
    _add_bench,
    _add_report,
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``stableopt`` command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show the library's log (a warning per intervention) on stderr",
    )
    parser = argparse.ArgumentParser(
        prog="stableopt",
        description="stableopt: training runs that survive NaNs, spikes and corrupted weights.",
    )
    parser.add_argument("--version", action="version", version=f"stableopt {stableopt.__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_subcommand in _SUBCOMMANDS:
        add_subcommand(subparsers, common)
    return parser


def _configure_logging(verbose: bool) -> None:
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    else:
        # The commands print the events themselves; a warning per intervention on the
        # console would only interleave with the report.
        logging.getLogger("stableopt").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``stableopt`` command; return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # every option after it is the benchmark command's own
        return _run_bench(argv[1:])
    args = build_parser().parse_args(argv)
    _configure_logging(getattr(args, "verbose", False))
    return int(args.handler(args))

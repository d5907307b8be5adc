"""The ``stableopt`` command: ``python -m stableopt demo`` (``bench`` and ``report`` to come).

Every subcommand is one ``_add_<name>(subparsers, common)`` function that adds
its parser and sets ``handler`` to the function that runs it; :func:`main` parses,
configures logging once and calls the handler. Heavy imports happen inside the
handlers, so ``stableopt --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Sequence
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
    parser.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    import torch

    from stableopt.demo import format_report, run_demo

    # The demo's MLP is tiny: intra-op threads cost more than they save (about 2x
    # slower on 2 busy cores), and this process is ours to configure.
    torch.set_num_threads(1)
    started = time.perf_counter()
    result = run_demo(steps=args.steps, seed=args.seed)
    print(format_report(result))
    print(f"\n({time.perf_counter() - started:.1f} s)")
    # A demo in which SafeOptimizer did not survive is a failure of the library.
    return 0 if result.method("SafeOptimizer").is_finite else 1


_SUBCOMMANDS: tuple[Callable[[_Subparsers, argparse.ArgumentParser], None], ...] = (_add_demo,)


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
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    return int(args.handler(args))

"""The ``stableopt`` command: ``python -m stableopt demo``, ``bench --perf`` (``report`` to come).

Every subcommand is one ``_add_<name>(subparsers, common)`` function that adds
its parser and sets ``handler`` to the function that runs it; :func:`main` parses,
configures logging once and calls the handler. Heavy imports happen inside the
handlers, so ``stableopt --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
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
        parents=[common],
        help="benchmarks: stability under faults (default) or --perf for the per-step overhead",
        description=(
            "Without --perf: the stability benchmark (plain AdamW, hand-written guards, ZClip, "
            "AutoClip, OLMo-core SkipStepAdamW and SafeOptimizer with each stage off in turn, "
            "under injected faults); writes stability.md, .csv and .png to --out. "
            "--perf: per-step time and peak memory of SafeOptimizer(X) (defaults, each stage alone, "
            "each clip policy) against X + clip_grad_norm_ and bare X, for SGD, Adam and AdamW in "
            "their for-loop, foreach and fused versions, measured interleaved in one process. "
            "Writes perf-<device>.md and .csv to --out and prints the Markdown."
        ),
    )
    parser.add_argument(
        "--perf", action="store_true", help="run the overhead benchmark (time and memory per step)"
    )
    perf = parser.add_argument_group("--perf options")
    perf.add_argument(
        "--quick",
        action="store_true",
        help="a 100k-parameter model and few rounds: seconds, for a check (writes perf-<device>-quick.*)",
    )
    perf.add_argument(
        "--sizes",
        type=_sizes,
        default=None,
        help="model sizes in parameters, comma-separated (default 1M,10M,50M)",
    )
    perf.add_argument(
        "--optimizers",
        type=_choices("sgd", "adam", "adamw"),
        default=None,
        help="inner optimizers, comma-separated, of sgd,adam,adamw (default all)",
    )
    perf.add_argument(
        "--impls",
        type=_choices("forloop", "foreach", "fused"),
        default=None,
        help="implementations, comma-separated, of forloop,foreach,fused (default all)",
    )
    perf.add_argument(
        "--rounds",
        type=_int_at_least(1),
        default=None,
        help="timed rounds per configuration (default by size: 30 at 1M, 10 at 10M, 5 at 50M)",
    )
    perf.add_argument(
        "--warmup",
        type=_int_at_least(0),
        default=None,
        help="untimed steps per method first (default by size: 5 at 1M, 2 from 2.5M)",
    )
    perf.add_argument(
        "--threads",
        type=_int_at_least(1),
        default=None,
        help=(
            "torch threads (default 1 on CPU: more threads than free cores make every "
            "OpenMP kernel wait for a descheduled thread on a shared machine)"
        ),
    )
    perf.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="where to measure (default cuda when available, else cpu)",
    )
    perf.add_argument("--out", default="results", help="output folder (default results/)")
    _add_stability_options(parser)
    parser.set_defaults(handler=_run_bench)


def _sizes(text: str) -> tuple[int, ...]:
    from stableopt.bench.perf import parse_size

    try:
        sizes = tuple(parse_size(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not sizes or min(sizes) < 1000:
        raise argparse.ArgumentTypeError(f"sizes must be parameter counts >= 1000, got {text!r}")
    return sizes


def _choices(*accepted: str) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(part.strip().lower() for part in text.split(",") if part.strip())
        unknown = [v for v in values if v not in accepted]
        if unknown or not values:
            raise argparse.ArgumentTypeError(
                f"must be a comma-separated list of {','.join(accepted)}, got {text!r}"
            )
        return values

    return parse


def _run_bench(args: argparse.Namespace) -> int:
    if args.perf:
        return _run_perf(args)
    return _run_stability(args)


def _run_stability(args: argparse.Namespace) -> int:
    from stableopt.bench.stability import QUICK, QUICK_STEPS, StabilityConfig, run_stability
    from stableopt.bench.stability_report import format_markdown, write_results

    chosen: dict[str, Any] = dict(QUICK) if args.quick else {}
    if args.quick:
        chosen.update(seeds=1, steps=dict(QUICK_STEPS), jobs=1)
    for name in ("scenarios", "methods", "families", "seeds", "jobs"):
        if getattr(args, name, None) is not None:
            chosen[name] = getattr(args, name)
    if args.steps is not None:
        chosen["steps"] = dict.fromkeys(("mlp", "lm"), args.steps)
    config = StabilityConfig(**chosen)
    result = run_stability(config, progress=not args.no_progress)
    result.command = "python -m stableopt " + shlex.join(args.argv)
    written = write_results(result, args.out, "stability-quick" if args.quick else "stability")
    print(format_markdown(result))
    print(f"(wrote {', '.join(written)}; {result.seconds:.0f} s)")
    return 0


def _add_stability_options(parser: argparse.ArgumentParser) -> None:
    from stableopt.bench.stability import FAMILIES, METHODS, SCENARIOS

    group = parser.add_argument_group("stability options (plain `bench`; --quick and --out too)")
    group.add_argument(
        "--scenarios",
        type=_choices(*SCENARIOS),
        default=None,
        help=f"comma-separated, of {','.join(SCENARIOS)} (default all)",
    )
    group.add_argument(
        "--methods",
        type=_choices(*METHODS),
        default=None,
        help=f"comma-separated, of {','.join(METHODS)} (default all)",
    )
    group.add_argument(
        "--families",
        type=_choices(*FAMILIES),
        default=None,
        help="model families, comma-separated, of mlp,lm (default both)",
    )
    group.add_argument(
        "--seeds", type=_int_at_least(1), default=None, help="seeds per cell (default 3)"
    )
    group.add_argument(
        "--steps",
        type=_int_at_least(10),
        default=None,
        help="training steps for every family (default mlp 80, lm 50)",
    )
    group.add_argument(
        "--jobs",
        type=_int_at_least(1),
        default=None,
        help="worker processes (default 2; 1 with --quick)",
    )
    group.add_argument(
        "--no-progress", action="store_true", help="no progress bar / progress lines"
    )


def _run_perf(args: argparse.Namespace) -> int:
    import torch

    from stableopt.bench.perf import QUICK_SIZES, PerfConfig, run_perf
    from stableopt.bench.perf_report import format_markdown, write_results

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("stableopt bench --perf: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    quick = {"sizes": QUICK_SIZES, "rounds": 15, "warmup": 3} if args.quick else {}
    chosen = {
        "sizes": args.sizes,
        "optimizers": args.optimizers,
        "impls": args.impls,
        "rounds": args.rounds,
        "warmup": args.warmup,
    }
    # On a GPU the host threads matter little: leave them as they are.
    threads = args.threads if args.threads is not None else (1 if device == "cpu" else None)
    config = PerfConfig(
        **{**quick, **{k: v for k, v in chosen.items() if v is not None}},
        threads=threads,
        device=device,
    )
    result = run_perf(config)
    result.command = "python -m stableopt " + shlex.join(args.argv)
    markdown_path, csv_path = write_results(
        result, args.out, f"perf-{device}{'-quick' if args.quick else ''}"
    )
    print(format_markdown(result))
    print(f"(wrote {markdown_path} and {csv_path}; {result.seconds:.0f} s)")
    return 0


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
    args = build_parser().parse_args(argv)
    args.argv = argv  # the exact command, for the benchmark's results file
    _configure_logging(args.verbose)
    return int(args.handler(args))

"""The benchmark command: ``python -m stableopt bench ...`` (or ``python -m benchmarks ...``).

The benchmarks live beside the package, in the source checkout, and are not
installed with it. Without a flag the stability benchmark runs; ``--perf`` runs the
per-step overhead benchmark. Heavy imports happen inside the handlers, so
``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["build_parser", "main"]


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


def build_parser(prog: str = "python -m stableopt bench") -> argparse.ArgumentParser:
    """The argument parser of the benchmark command."""
    parser = argparse.ArgumentParser(
        prog=prog,
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
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show the library's log (a warning per intervention) on stderr",
    )
    return parser


def _sizes(text: str) -> tuple[int, ...]:
    from benchmarks.perf import parse_size

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
    from benchmarks.stability import QUICK, QUICK_STEPS, StabilityConfig, run_stability
    from benchmarks.stability_report import format_markdown, write_results

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
    from benchmarks.stability import FAMILIES, METHODS, SCENARIOS

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

    from benchmarks.perf import QUICK_SIZES, PerfConfig, run_perf
    from benchmarks.perf_report import format_markdown, write_results

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


def main(argv: Sequence[str] | None = None, prog: str = "python -m stableopt bench") -> int:
    """Run the benchmark command; return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    args.argv = ["bench", *argv]  # the exact command, for the results files
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    else:
        # The reports print what happened; a warning per intervention would interleave.
        logging.getLogger("stableopt").setLevel(logging.ERROR)
    return _run_bench(args)

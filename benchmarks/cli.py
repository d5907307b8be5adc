"""The benchmark command: ``python -m stableopt bench ...`` (or ``python -m benchmarks ...``).

The benchmarks live beside the package, in the source checkout, and are not
installed with it. Without a mode flag the stability benchmark runs; ``--harm`` runs
the do-no-harm benchmark (:mod:`benchmarks.harm`), ``--lr-sweep`` the LR-sensitivity
sweep (:mod:`benchmarks.lr_sweep`), ``--recipes`` the real-recipes benchmark
(:mod:`benchmarks.recipes`) and ``--perf`` the per-step overhead benchmark; the
modes are mutually exclusive. ``--quick``, ``--out``, ``--seeds``, ``--steps``,
``--jobs`` and ``--no-progress`` are shared; each mode has its own option group. The
benchmarks run themselves inside the handlers.
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
            "Without a mode flag: the stability benchmark (plain AdamW, hand-written guards, "
            "ZClip, AutoClip, OLMo-core SkipStepAdamW, ARC, StabilityGuard and SafeOptimizer "
            "with each stage off in turn, under injected faults); writes stability.md, .csv and "
            ".png to --out. "
            "--harm: the do-no-harm benchmark (plain X vs SafeOptimizer(X) on healthy "
            "configurations: deaths, skips, rollbacks, LR cuts, loss ratio); writes harm.*. "
            "--lr-sweep: the LR-sensitivity sweep (final loss against the learning rate per "
            "method, and the sensitivity of Wortsman et al. 2023); writes lr_sweep.*. "
            "--recipes: the real-recipes benchmark (nanoGPT, Tacotron 2, torchvision's ResNet, "
            "OpenNMT-py's LSTM seq2seq and the HF Trainer as their authors wrote them, scaled "
            "down; each as written, without its clip, and with SafeOptimizer keeping, taking "
            "over or dropping the clip; healthy and under faults); writes recipes.*. "
            "--perf: per-step time and peak memory of SafeOptimizer(X) (defaults, each stage alone, "
            "each clip policy) against X + clip_grad_norm_ and bare X, for SGD, Adam and AdamW in "
            "their for-loop, foreach and fused versions, measured interleaved in one process. "
            "Writes perf-<device>.md and .csv to --out and prints the Markdown."
        ),
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--perf", action="store_true", help="run the overhead benchmark (time and memory per step)"
    )
    mode.add_argument(
        "--harm", action="store_true", help="run the do-no-harm benchmark (healthy training)"
    )
    mode.add_argument("--lr-sweep", action="store_true", help="run the LR-sensitivity sweep")
    mode.add_argument(
        "--recipes",
        action="store_true",
        help="run the real-recipes benchmark (public training recipes, scaled down)",
    )
    common = parser.add_argument_group("options of every benchmark")
    common.add_argument(
        "--quick",
        action="store_true",
        help="a small version for a check, seconds to a minute (writes <name>-quick.*)",
    )
    common.add_argument("--out", default="results", help="output folder (default results/)")
    common.add_argument(
        "--seeds", type=_int_at_least(1), default=None, help="seeds per cell (default 3)"
    )
    common.add_argument(
        "--steps",
        type=_int_at_least(10),
        default=None,
        help="training steps of every run (default each family's / configuration's / task's own)",
    )
    common.add_argument(
        "--jobs",
        type=_int_at_least(1),
        default=None,
        help="worker processes (default 2; 1 with --quick)",
    )
    common.add_argument(
        "--no-progress", action="store_true", help="no progress bar / progress lines"
    )
    perf = parser.add_argument_group("--perf options")
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
    _add_stability_options(parser)
    _add_harm_options(parser)
    _add_sweep_options(parser)
    _add_recipe_options(parser)
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
    if args.harm:
        return _run_harm(args)
    if args.lr_sweep:
        return _run_sweep(args)
    if args.recipes:
        return _run_recipes(args)
    return _run_stability(args)


def _shared(args: argparse.Namespace, chosen: dict[str, Any]) -> dict[str, Any]:
    """``chosen`` with --seeds, --jobs and --steps where given."""
    for name in ("seeds", "jobs", "steps"):
        if getattr(args, name, None) is not None:
            chosen[name] = getattr(args, name)
    return chosen


def _add_harm_options(parser: argparse.ArgumentParser) -> None:
    from benchmarks.harm_cases import CASES

    names = [case.name for case in CASES]
    group = parser.add_argument_group("--harm options")
    group.add_argument(
        "--configs",
        type=_choices(*names),
        default=None,
        help=f"healthy configurations, comma-separated, of {','.join(names)} (default all)",
    )


def _run_harm(args: argparse.Namespace) -> int:
    from benchmarks.harm import QUICK_CASES, HarmConfig, run_harm
    from benchmarks.harm_report import format_markdown, write_results

    chosen: dict[str, Any] = (
        {"cases": QUICK_CASES, "seeds": 1, "steps": 60, "jobs": 1} if args.quick else {}
    )
    if args.configs is not None:
        chosen["cases"] = args.configs
    result = run_harm(HarmConfig(**_shared(args, chosen)), progress=not args.no_progress)
    result.command = "python -m stableopt " + shlex.join(args.argv)
    written = write_results(result, args.out, "harm-quick" if args.quick else "harm")
    print(format_markdown(result))
    print(f"(wrote {', '.join(written)}; {result.seconds:.0f} s)")
    return 0


def _add_sweep_options(parser: argparse.ArgumentParser) -> None:
    from benchmarks.lr_sweep import SCHEDULES, SWEEP_METHODS, TASKS

    group = parser.add_argument_group("--lr-sweep options")
    group.add_argument(
        "--tasks",
        type=_choices(*TASKS),
        default=None,
        help=f"comma-separated, of {','.join(TASKS)} (default all)",
    )
    group.add_argument(
        "--schedules",
        type=_choices(*SCHEDULES),
        default=None,
        help=f"comma-separated, of {','.join(SCHEDULES)} (default both)",
    )
    group.add_argument(
        "--sweep-methods",
        type=_choices(*SWEEP_METHODS),
        default=None,
        help=f"comma-separated, of {','.join(SWEEP_METHODS)} (default all)",
    )
    group.add_argument(
        "--lrs",
        type=_floats,
        default=None,
        help="learning rates, comma-separated (default each task's own grid)",
    )


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"must be positive numbers, comma-separated, got {text!r}")
    return tuple(sorted(set(values)))


def _run_sweep(args: argparse.Namespace) -> int:
    from benchmarks.lr_sweep import QUICK, SweepConfig, run_sweep
    from benchmarks.lr_sweep_report import format_markdown, write_results

    chosen: dict[str, Any] = dict(QUICK) if args.quick else {}
    for option, name in (
        ("tasks", "tasks"),
        ("schedules", "schedules"),
        ("sweep_methods", "methods"),
        ("lrs", "lrs"),
    ):
        if getattr(args, option) is not None:
            chosen[name] = getattr(args, option)
    result = run_sweep(SweepConfig(**_shared(args, chosen)), progress=not args.no_progress)
    result.command = "python -m stableopt " + shlex.join(args.argv)
    written = write_results(result, args.out, "lr_sweep-quick" if args.quick else "lr_sweep")
    print(format_markdown(result))
    print(f"(wrote {', '.join(written)}; {result.seconds:.0f} s)")
    return 0


def _add_recipe_options(parser: argparse.ArgumentParser) -> None:
    from benchmarks.recipes import FAMILIES, FAULTS, RECIPES, VARIANTS

    names = [*FAMILIES, *(n for n in RECIPES if n not in FAMILIES)]
    group = parser.add_argument_group("--recipes options")
    group.add_argument(
        "--names",
        type=_choices(*names),
        default=None,
        help=f"recipes, comma-separated, of {','.join(names)} (a family name stands for all "
        "its rows; default all)",
    )
    group.add_argument(
        "--variants",
        type=_choices(*VARIANTS),
        default=None,
        help=f"comma-separated, of {','.join(VARIANTS)} (default all)",
    )
    group.add_argument(
        "--faults",
        type=_choices(*FAULTS),
        default=None,
        help=f"comma-separated, of {','.join(FAULTS)} (default all; recipe_noclip then runs "
        "healthy only)",
    )


def _run_recipes(args: argparse.Namespace) -> int:
    from benchmarks.recipes import QUICK, RecipeConfig, run_recipes
    from benchmarks.recipes_report import format_markdown, write_results

    chosen: dict[str, Any] = dict(QUICK) if args.quick else {}
    for option, name in (("names", "recipes"), ("variants", "variants"), ("faults", "faults")):
        if getattr(args, option) is not None:
            chosen[name] = getattr(args, option)
    result = run_recipes(RecipeConfig(**_shared(args, chosen)), progress=not args.no_progress)
    result.command = "python -m stableopt " + shlex.join(args.argv)
    written = write_results(result, args.out, "recipes-quick" if args.quick else "recipes")
    print(format_markdown(result))
    print(f"(wrote {', '.join(written)}; {result.seconds:.0f} s)")
    return 0


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

    group = parser.add_argument_group("stability options (plain `bench`)")
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

"""The real-recipes benchmark: SafeOptimizer's defaults on training runs it was not tuned on.

``python -m stableopt bench --recipes`` runs every recipe of :data:`RECIPES` (nanoGPT's
character model, NVIDIA's Tacotron 2 in three situations, torchvision's ResNet
reference with SGD and Nesterov, OpenNMT-py's LSTM encoder-decoder, a tiny GPT-2
through the real Hugging Face ``Trainer``), each written the way its public authors
wrote it and scaled down to a CPU core, in five variants:

- ``recipe``: as written (its own gradient clip included);
- ``recipe_noclip``: as written, its clip line removed (the reference of ``safe_default``);
- ``safe_keepclip``: only the optimizer swapped for ``SafeOptimizer(inner)`` (defaults),
  the user's clip line kept;
- ``safe_clip``: the user's clip removed and moved into ``SafeOptimizer(inner, clip=c)``;
- ``safe_default``: the user's clip removed, ``SafeOptimizer(inner)`` with its defaults.

A recipe without a clip of its own (torchvision's) has only ``recipe`` and
``safe_default``: keeping or moving a clip does not apply. Each variant runs healthy
and under the faults of :data:`~benchmarks.recipes_base.FAULTS` (one NaN batch at 40% of
the run, one batch x1e3 there, the LR x10 all run), except ``recipe_noclip``, which runs
healthy only unless faults are asked for by name, on 3 seeds; every variant of a seed
starts from the same weights and sees the same batches. Per run it records the held-out
loss before and after (``eval()`` mode), a death (a ``DivergenceError`` or a
non-finite final loss), SafeOptimizer's skipped steps, rollbacks, LR cuts and
recoveries, clipped and emergency-clipped steps, the steps the recipe's own clip
scaled, the first few interventions in words, and the seconds the loop took.
:mod:`benchmarks.recipes_summary` judges them; :mod:`benchmarks.recipes_report`
writes ``recipes.md``, ``.csv`` and ``.png``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch.optim import Optimizer

from benchmarks.harm import count_lr_changes
from benchmarks.pool import run_jobs
from benchmarks.recipes_base import FAULTS, LR_FAULT, RecipeRun, Wrap
from benchmarks.recipes_gpt import build_nanogpt
from benchmarks.recipes_resnet import build_resnet
from benchmarks.recipes_seq2seq import build_seq2seq
from benchmarks.recipes_tacotron import build_tacotron
from stableopt import Monitor, SafeOptimizer

__all__ = [
    "FAMILIES",
    "FAULTS",
    "QUICK",
    "RECIPES",
    "VARIANTS",
    "RecipeConfig",
    "RecipeRecord",
    "RecipeResult",
    "RecipeSpec",
    "hf_unavailable",
    "run_one",
    "run_recipes",
    "variant_applies",
    "variant_wrap",
]

VARIANTS = ("recipe", "recipe_noclip", "safe_keepclip", "safe_clip", "safe_default")
#: variant -> the recipe's own clip line is kept
_KEEPS_CLIP = {
    "recipe": True,
    "recipe_noclip": False,
    "safe_keepclip": True,
    "safe_clip": False,
    "safe_default": False,
}


def _build_hf(seed: int, **kwargs: Any) -> RecipeRun:
    from benchmarks.recipes_hf import build_hf  # transformers is optional

    return build_hf(seed, **kwargs)


@dataclass(frozen=True)
class RecipeSpec:
    """One row of the benchmark: a recipe (or one situation of it) and how it was scaled."""

    name: str
    family: str
    build: Callable[..., RecipeRun]  # (seed, *, wrap, keep_clip, steps, lr) -> RecipeRun
    clip: float  # the recipe's own max gradient norm; 0: it has none
    lr: float  # the recipe's (peak) LR
    steps: int
    reference: str  # the public reference it reproduces
    scaled: str  # what was scaled down
    short: str  # both in a few words, for the plot
    needs: str = ""  # an optional package it imports


RECIPES: dict[str, RecipeSpec] = {
    s.name: s
    for s in (
        RecipeSpec(
            "nanogpt",
            "nanogpt",
            build_nanogpt,
            1.0,
            1e-3,
            120,
            "karpathy/nanoGPT config/train_shakespeare_char.py + train.py + model.py "
            "(AdamW (0.9, 0.99), wd 0.1 on 2-D params, warm-up + cosine 1e-3 -> 1e-4, "
            "GradScaler(enabled=False) path, clip_grad_norm_(1.0), dropout 0.2, tied "
            "embeddings)",
            "2 layers x 4 heads x 64 (6 x 6 x 384), block 64 (256), batch 16 (64), "
            "the standard library's source instead of Shakespeare",
            "karpathy/nanoGPT shakespeare_char\n2 layers x 64, block 64, batch 16",
        ),
        *(
            RecipeSpec(
                f"tacotron2-{situation}",
                "tacotron2",
                functools.partial(build_tacotron, situation),
                1.0,
                1e-3,
                64,
                "NVIDIA/tacotron2 model.py + hparams.py + train.py + loss_function.py (Adam "
                "1e-3, wd 1e-6, clip_grad_norm_(1.0), teacher forcing, mask_padding)"
                + {
                    "mean": "",
                    "sum": '; mel MSE terms with reduction="sum" (as some forks)',
                    "ddc": "; + Coqui TTS double decoder consistency (coarse decoder r=2, "
                    "0.25 x (coarse MSE + L1 of the alignments))",
                }[situation],
                "dims 32-64 (512-1024), 20 mel channels (80), batch 16 (64), synthetic "
                "text/mel pairs of 6-21 frames",
                "NVIDIA/tacotron2"
                + {"mean": "", "sum": ', reduction="sum"', "ddc": " + Coqui DDC (r=2)"}[situation]
                + "\ndims 32-64, 20 mels, batch 16",
            )
            for situation in ("mean", "sum", "ddc")
        ),
        *(
            RecipeSpec(
                f"resnet-{sub}",
                "resnet",
                functools.partial(build_resnet, sub),
                0.0,
                0.025,
                150,
                "pytorch/vision references/classification/train.py, BasicBlock ResNet "
                + (
                    "(--opt sgd, momentum 0.9, wd 1e-4, StepLR every third of the run)"
                    if sub == "sgd"
                    else "(--opt sgd_nesterov, momentum 0.9, wd 5e-4, 1 epoch linear "
                    "warm-up + CosineAnnealingLR)"
                )
                + "; lr 0.1 x batch / 256; no clip (--clip-grad-norm off)",
                "3 stages of 1 BasicBlock at 8/16/32 channels (ResNet-18: 4 x 2 at 64-512), "
                "synthetic 3x16x16 images of 10 classes, batch 64, 6 epochs of 25 steps",
                f"torchvision classification reference ({sub})\n3 stages at 8-32 ch., 16x16 images",
            )
            for sub in ("sgd", "nesterov")
        ),
        RecipeSpec(
            "seq2seq",
            "seq2seq",
            build_seq2seq,
            5.0,
            1.0,
            100,
            "OpenNMT/OpenNMT-py onmt/opts.py defaults: 2-layer LSTM encoder-decoder, "
            "input feeding, global 'general' attention, dropout 0.3, SGD lr 1.0, "
            "max_grad_norm 5, LR x0.5 from 50% of the run every 10%, uniform init 0.1",
            "embeddings 32 and LSTMs 64 (500, 500), batch 32 (64); the data: reverse 4-8 "
            "character chunks of the standard library's source",
            "OpenNMT-py defaults (LSTM, SGD 1.0, clip 5)\nLSTMs 64, reverse 4-8 chars",
        ),
        RecipeSpec(
            "hf_trainer",
            "hf_trainer",
            _build_hf,
            1.0,
            1e-3,
            80,
            "huggingface/transformers Trainer (run_clm.py style, GPT2Config from scratch): "
            "its default AdamW (adamw_torch_fused), linear warm-up schedule, "
            "max_grad_norm=1.0",
            "GPT-2 of 2 layers, hidden 64, 4 heads, blocks of 64 characters, batch 16, "
            "lr 1e-3, warm-up 10%",
            "transformers.Trainer defaults\nGPT-2 2 layers x 64, block 64",
            needs="transformers",
        ),
    )
}

#: family name -> its rows
FAMILIES: dict[str, tuple[str, ...]] = {}
for _spec in RECIPES.values():
    FAMILIES[_spec.family] = (*FAMILIES.get(_spec.family, ()), _spec.name)


def hf_unavailable() -> str:
    """Why the ``hf_trainer`` recipe cannot run here ("" when it can)."""
    try:
        import accelerate  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        return f"transformers/accelerate cannot be imported ({exc})"
    return ""


def variant_applies(spec: RecipeSpec, variant: str) -> bool:
    """Without a clip of its own, a recipe has only ``recipe`` and ``safe_default``."""
    return spec.clip > 0 or variant in ("recipe", "safe_default")


def variant_wrap(spec: RecipeSpec, variant: str) -> Wrap | None:
    """The wrapper hook of ``variant``: ``None`` (the recipe's optimizer) or a SafeOptimizer."""
    if not variant.startswith("safe_"):
        return None
    options: dict[str, Any] = {"clip": spec.clip} if variant == "safe_clip" else {}

    def wrap(inner: Optimizer) -> Optimizer:
        # Defaults; only the event buffer is made big enough to count every event.
        return SafeOptimizer(inner, monitor=Monitor(max_events=1_000_000), **options)

    return wrap


@dataclass
class RecipeRecord:
    """One (recipe, variant, fault, seed) run."""

    recipe: str
    variant: str
    fault: str
    seed: int
    steps: int
    initial: float
    final: float
    died: bool
    error: str = ""
    skipped: int = 0
    spike_skips: int = 0
    rollbacks: int = 0
    lr_cuts: int = 0
    lr_recoveries: int = 0
    clips: int = 0
    emergency_clips: int = 0
    buffer_restores: int = 0
    own_clips: int = -1  # steps the recipe's own clip scaled (-1: no clip line ran)
    seconds: float = 0.0
    first_events: list[str] = field(default_factory=list)  # "step kind: reason"
    first_clips: list[str] = field(default_factory=list)  # "step clip: norm > threshold"
    median_clip_factor: float = 1.0  # median coefficient over SafeOptimizer's clipped steps


def run_one(
    name: str, variant: str, fault: str, seed: int, steps: int | None = None
) -> RecipeRecord:
    """Run ``name`` in ``variant`` under ``fault`` on ``seed``."""
    spec = RECIPES[name]
    steps = steps or spec.steps
    run = spec.build(
        seed,
        wrap=variant_wrap(spec, variant),
        keep_clip=_KEEPS_CLIP[variant],
        steps=steps,
        lr=spec.lr * (10.0 if fault == LR_FAULT else 1.0),
    )
    outcome = run.run(fault)
    record = RecipeRecord(
        name,
        variant,
        fault,
        seed,
        steps,
        outcome.initial,
        outcome.final,
        outcome.died,
        outcome.error,
        own_clips=outcome.own_clips,
        seconds=outcome.seconds,
    )
    safe = run.safe
    if safe is not None:
        stats, events = safe.stats(), safe.events()
        record.skipped = int(stats["skipped_steps"])
        record.spike_skips = int(stats.get("spike_skips", 0))
        record.rollbacks = int(stats["rollbacks"])
        record.clips = int(stats["total_clips"])
        record.emergency_clips = int(stats["emergency_clips"])
        record.buffer_restores = int(stats.get("buffer_restores", 0))
        record.lr_cuts, record.lr_recoveries = count_lr_changes(events)
        record.first_events = [f"{e.step} {e.kind}: {e.reason[:200]}" for e in events[:4]]
        record.first_clips = list(outcome.log.clipped)
        factors = sorted(outcome.log.clip_coefficients)
        record.median_clip_factor = factors[len(factors) // 2] if factors else 1.0
    return record


# -- the suite --------------------------------------------------------------------


@dataclass(frozen=True)
class RecipeConfig:
    """What :func:`run_recipes` runs.

    ``faults=None`` runs every fault for every variant but ``recipe_noclip`` (healthy
    only); faults given by name run for every chosen variant.
    """

    recipes: tuple[str, ...] = tuple(RECIPES)
    variants: tuple[str, ...] = VARIANTS
    faults: tuple[str, ...] | None = None
    seeds: int = 3
    steps: int | None = None  # override every recipe's run length
    jobs: int = 2
    threads: int = 1


#: ``--quick``: three recipes, short runs, one seed, healthy and one fault
QUICK: dict[str, Any] = {
    "recipes": ("nanogpt", "resnet-sgd", "tacotron2-mean"),
    "variants": ("recipe", "recipe_noclip", "safe_keepclip", "safe_default"),
    "faults": ("healthy", "nan_batch"),
    "seeds": 1,
    "steps": 30,
    "jobs": 1,
}


@dataclass
class RecipeResult:
    config: RecipeConfig
    records: list[RecipeRecord]
    seconds: float
    skipped_recipes: dict[str, str] = field(default_factory=dict)  # name -> why not run
    command: str = ""


def resolve_names(names: tuple[str, ...]) -> tuple[str, ...]:
    """Recipe rows of ``names``: a row name, or a family name standing for all its rows."""
    rows: list[str] = []
    for name in names:
        if name in RECIPES:
            chosen: tuple[str, ...] = (name,)
        elif name in FAMILIES:
            chosen = FAMILIES[name]
        else:
            raise ValueError(
                f"unknown recipe {name!r}; known: {sorted(RECIPES)} or {sorted(FAMILIES)}"
            )
        rows += [row for row in chosen if row not in rows]
    return tuple(rows)


def jobs_of(
    config: RecipeConfig, names: tuple[str, ...]
) -> list[tuple[str, str, str, int, int | None]]:
    """Every ``(recipe, variant, fault, seed, steps)`` the configuration runs."""
    faults = config.faults if config.faults is not None else FAULTS
    jobs = []
    for name in names:
        for variant in config.variants:
            if not variant_applies(RECIPES[name], variant):
                continue
            for fault in faults:
                if config.faults is None and variant == "recipe_noclip" and fault != "healthy":
                    continue
                jobs += [(name, variant, fault, seed, config.steps) for seed in range(config.seeds)]
    return jobs


def run_recipes(config: RecipeConfig, progress: bool = True) -> RecipeResult:
    """Every job of :func:`jobs_of`, ``config.jobs`` worker processes at a time."""
    unknown = [v for v in config.variants if v not in VARIANTS]
    unknown += [f for f in config.faults or () if f not in FAULTS]
    if unknown:
        raise ValueError(f"unknown variants/faults {unknown}; known: {VARIANTS}, {FAULTS}")
    names = resolve_names(config.recipes)
    skipped = {}
    why = hf_unavailable()
    for name in names:
        if RECIPES[name].needs == "transformers" and why:
            skipped[name] = why
    names = tuple(n for n in names if n not in skipped)
    started = time.perf_counter()
    jobs = jobs_of(config, names)
    # The slow ones (Tacotron's decoder loop) first, so that the workers finish together.
    jobs.sort(key=lambda job: RECIPES[job[0]].family != "tacotron2")
    records = run_jobs(
        run_one,
        jobs,
        workers=config.jobs,
        threads=config.threads,
        progress=progress,
        label=lambda r: f"{r.recipe}/{r.variant}/{r.fault}",
    )
    order = {name: i for i, name in enumerate(names)}
    records.sort(
        key=lambda r: (order[r.recipe], VARIANTS.index(r.variant), FAULTS.index(r.fault), r.seed)
    )
    return RecipeResult(config, records, time.perf_counter() - started, skipped)

"""The stability benchmark: SafeOptimizer(AdamW) against what people use today, under faults.

``python -m stableopt bench`` trains small models under each *scenario* (a fault, a
bad setting or an awkward task: :mod:`benchmarks.stability_scenarios`) with each
*method* (plain AdamW, AdamW with the usual hand-written guards, ZClip, AutoClip,
OLMo-core's SkipStepAdamW, the peers ARC and StabilityGuard, SafeOptimizer with
defaults and with each stage off in turn: :mod:`benchmarks.stability_methods`), on the same seeds, weights and data
order, and records the final held-out loss as a ratio to plain AdamW on the
fault-free run of the same task and seed. This module runs them;
:mod:`benchmarks.stability_report` writes the results and
:mod:`benchmarks.stability_plot` draws them.

The faults come from :mod:`stableopt.testing.faults` (:class:`FaultSchedule`,
:class:`FaultInjector`); the few that do not exist there for token data are
made here, at the same point of the step: ``inf_loss`` on the LM sets one logit
to ``+inf`` (an fp16-style overflow on a bad batch), ``poison_batch`` on the LM
gives the batch random targets with a loss weight of ``poison_scale`` (a
mislabelled batch with a broken sample weight: huge but finite gradients), and
``grad_spike`` multiplies the gradients by a per-step factor in [1e3, 1e6] (a fixed
factor where the scenario sets ``spike_factor``: ``grad_x1e4_every6``). Recurring
faults (``nan_grad_every7``, ``grad_x1e4_every6``) hit every k-th step; a loss-scale
stage (``loss_x1e4_from40``) sets the loss weight of the steps after 40% of the run to
1e4, on the training loss only: the held-out loss is always the task's own, unscaled.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.stability_methods import (
    ABLATIONS,
    BASELINES,
    METHODS,
    _Runner,
    olmo_status,
    unavailable_methods,
)
from benchmarks.stability_scenarios import (
    _STRIDE,
    FAMILIES,
    SCENARIOS,
    Family,
    Scenario,
    TokenTask,
    _WeightedLoss,
)
from benchmarks.tasks import Images
from stableopt.errors import DivergenceError
from stableopt.testing.faults import FaultInjector, FaultSchedule, RegressionTask

# The families, scenarios and methods are re-exported: they are the benchmark's vocabulary.
__all__ = [
    "ABLATIONS",
    "BASELINES",
    "FAMILIES",
    "METHODS",
    "SCENARIOS",
    "RunRecord",
    "StabilityConfig",
    "StabilityResult",
    "TokenTask",
    "olmo_status",
    "run_stability",
]


# -- one run ----------------------------------------------------------------------


@dataclass
class RunRecord:
    """One (family, scenario, method, seed) run."""

    family: str
    scenario: str
    method: str
    seed: int
    held_out: float
    reference: float
    diverged: bool
    skipped: int
    rollbacks: int
    lr_cuts: int
    error: str = ""

    @property
    def ratio(self) -> float:
        """Held-out loss / the reference run's (``inf`` when diverged)."""
        if self.diverged or not math.isfinite(self.held_out):
            return math.inf
        return self.held_out / self.reference


class _Injector(FaultInjector):
    """:class:`FaultInjector` plus a per-step spike factor in [1e3, 1e6] (unless
    ``fixed_spikes``: then the schedule's own ``spike_factor``)."""

    fixed_spikes = False

    def corrupt_grads(self, params: Iterable[Tensor]) -> None:
        if self.fault != "grad_spike" or self.fixed_spikes:
            super().corrupt_grads(params)
            return
        step = self._step
        factor = 10.0 ** random.Random(self.seed * _STRIDE + step).uniform(3.0, 6.0)
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(factor)
        self.injected.append((step, "grad_spike"))


def _task(family: Family, scenario: Scenario, seed: int) -> RegressionTask | TokenTask | Images:
    return family.make_task(seed=seed, **scenario.task_options.get(family.name, {}))


def _held_out(
    model: nn.Module,
    task: RegressionTask | TokenTask | Images,
    base: Callable[..., Tensor],
    eval_mode: bool = False,
) -> float:
    was_training = model.training
    if eval_mode:
        model.eval()
    try:
        with torch.no_grad():
            x, y = task.held_out()
            return float(base(model(x), y))
    finally:
        model.train(was_training)


def _lr_multiplier(
    schedule: str, steps: int, burst: tuple[float, float, float] | None = None
) -> Callable[[int], float]:
    """``LambdaLR``'s multiplier of step ``t`` (0-based) for ``schedule`` over ``steps`` steps
    (``burst``: ``(start, length, factor)`` shares of the run where it is ``factor`` times that)."""
    warmup = max(1, steps // 20)

    def base(t: int) -> float:
        if schedule == "constant":
            return 1.0
        if t < warmup:
            return (t + 1) / warmup
        progress = min(1.0, (t - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    if burst is None:
        return base
    start, length, factor = burst
    first, last = int(start * steps), int((start + length) * steps)
    return lambda t: base(t) * (factor if first <= t < last else 1.0)


def run_one(
    family: Family,
    scenario: Scenario,
    method: type[_Runner],
    seed: int,
    steps: int | None = None,
) -> RunRecord:
    """Train one method on one scenario and seed (``steps``: override the run length).

    The record's ``reference`` is left NaN: :func:`run_stability` fills it in from
    plain AdamW's fault-free run of the same task and seed.
    """
    steps = steps or scenario.steps.get(family.name) or family.steps
    task = _task(family, scenario, seed)
    model = task.make_model()
    loss_module = _WeightedLoss(family.base_loss)
    runner = method(model, family.lr * scenario.lr_factor, loss_module)
    # The user's schedule: stepped once per loop step, skipped steps included.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        runner.optimizer, _lr_multiplier(scenario.lr_schedule, steps, scenario.lr_burst)
    )
    runner.attach_scheduler(scheduler)
    schedule = scenario.schedule(steps, seed) if family.name in scenario.families else None
    schedule = schedule or FaultSchedule()
    is_lm = isinstance(task, TokenTask)
    error = ""
    injector = _Injector(schedule, runner.optimizer, seed=seed)
    injector.fixed_spikes = scenario.spike_factor is not None
    with injector:
        for step in range(1, steps + 1):
            fault = injector.begin_step(step)
            x, y = task.batch(step)
            loss_module.weight = scenario.loss_weight(step, steps)
            if not is_lm:
                x, y = injector.corrupt_batch(x, y)
            elif fault == "poison_batch":
                generator = torch.Generator().manual_seed(seed * _STRIDE + step)
                y = torch.randint(0, task.vocab, y.shape, generator=generator)  # type: ignore[union-attr]
                loss_module.weight = schedule.poison_scale
            runner.optimizer.zero_grad()
            pred = model(x)
            if is_lm and fault == "inf_loss":
                hit = torch.zeros(pred.shape, dtype=torch.bool)
                hit[0, 0, 0] = True
                pred = pred.masked_fill(hit, math.inf)
            loss = runner.loss(pred, y)
            loss.backward()
            injector.corrupt_grads(runner.params)
            try:
                runner.step(loss)
            except DivergenceError as exc:
                error = f"DivergenceError at step {step}: {str(exc).splitlines()[0][:120]}"
                break
            scheduler.step()
    # unweighted: the task's own loss
    held_out = _held_out(model, task, family.base_loss, family.eval_mode)
    skipped, rollbacks, cuts = runner.counters()
    runner.close()
    return RunRecord(
        family.name,
        scenario.name,
        method.name,
        seed,
        held_out,
        math.nan,
        bool(error) or not math.isfinite(held_out),
        skipped,
        rollbacks,
        cuts,
        error,
    )


# -- the suite --------------------------------------------------------------------


@dataclass(frozen=True)
class StabilityConfig:
    """What :func:`run_stability` runs: which cells, how many seeds, how many workers."""

    scenarios: tuple[str, ...] = tuple(SCENARIOS)
    methods: tuple[str, ...] = tuple(METHODS)
    families: tuple[str, ...] = tuple(FAMILIES)
    seeds: int = 3
    steps: dict[str, int] | None = None  # family -> steps; default the family's own
    threads: int = 1
    jobs: int = 2  # worker processes


QUICK = {"scenarios": ("clean", "nan_grad"), "methods": ("adamw", "adamw+clip", "safe")}
QUICK_STEPS = {"mlp": 60, "lm": 30}


@dataclass
class StabilityResult:
    """The records of a :func:`run_stability` call and how it ran."""

    config: StabilityConfig
    records: list[RunRecord]
    seconds: float
    unavailable: dict[str, str]  # method -> why it could not run here
    command: str = ""


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm

        return tqdm(total=total, unit="run", dynamic_ncols=True)
    except ImportError:
        return None


def _run_job(
    family_name: str,
    scenario_name: str,
    method_name: str,
    seed: int,
    steps: int | None,
    threads: int,
) -> RunRecord:
    """One run, in a worker process."""
    import logging

    # Events are counted, not printed (ours and the peers' loggers alike).
    for name in ("stableopt", "arc", "stabilityguard"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(threads)
    family, scenario = FAMILIES[family_name], SCENARIOS[scenario_name]
    return run_one(family, scenario, METHODS[method_name], seed, steps)


def _reference_scenario(scenario: str) -> str:
    return scenario if SCENARIOS[scenario].own_reference else "clean"


def run_stability(config: StabilityConfig, progress: bool = True) -> StabilityResult:
    """Run every (family, scenario, method, seed) of ``config``, ``config.jobs`` at a time.

    Each record's ratio is to plain AdamW's fault-free run of the same task and seed
    (the ``clean`` scenario, or the scenario itself where it sets ``own_reference``);
    that run is made once per (family, task, seed) even when ``adamw`` or ``clean`` is not
    among the chosen methods or scenarios (it is then left out of the records).
    """
    from concurrent.futures import Future, ProcessPoolExecutor

    started = time.perf_counter()
    unavailable = unavailable_methods()
    methods = tuple(m for m in config.methods if m not in unavailable)
    wanted = [
        (f, s, m, seed)
        for f in config.families
        for s in config.scenarios
        if f in SCENARIOS[s].families
        for seed in range(config.seeds)
        for m in methods
    ]
    references = {(f, _reference_scenario(s), "adamw", seed) for f, s, _, seed in wanted}
    runs = list(dict.fromkeys([*wanted, *sorted(references - set(wanted))]))
    # The slow ones first (the LM family), so that the workers finish together.
    runs.sort(key=lambda run: run[0] != "lm")
    steps = config.steps or {}
    jobs = [(f, s, m, seed, steps.get(f), config.threads) for f, s, m, seed in runs]
    bar = _progress(len(jobs), progress)
    results: dict[tuple[str, str, str, int], RunRecord] = {}

    def report(record: RunRecord) -> None:
        results[(record.family, record.scenario, record.method, record.seed)] = record
        if bar is not None:
            bar.set_postfix_str(f"{record.family}/{record.scenario}/{record.method}", refresh=False)
            bar.update(1)
        elif progress and (len(results) % 25 == 0 or len(results) == len(jobs)):
            elapsed = time.perf_counter() - started
            print(f"[{len(results)}/{len(jobs)} runs] {elapsed:.0f} s", flush=True)

    try:
        if config.jobs <= 1:
            for job in jobs:
                report(_run_job(*job))
        else:
            import multiprocessing

            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(config.jobs, mp_context=context) as pool:
                futures: list[Future[RunRecord]] = [pool.submit(_run_job, *j) for j in jobs]
                for future in futures:
                    report(future.result())
    finally:
        if bar is not None:
            bar.close()
    records = []
    for f, s, m, seed in wanted:
        record = results[(f, s, m, seed)]
        record.reference = results[(f, _reference_scenario(s), "adamw", seed)].held_out
        records.append(record)
    return StabilityResult(config, records, time.perf_counter() - started, unavailable)

"""The stability benchmark: SafeOptimizer(AdamW) against what people use today, under faults.

``python -m stableopt bench`` trains small models under each *scenario* (a fault, a
bad setting or an awkward task) with each *method* (plain AdamW, AdamW with the
usual hand-written guards, ZClip, AutoClip, OLMo-core's SkipStepAdamW,
SafeOptimizer with defaults and with each stage off in turn), on the same seeds,
weights and data order, and reports the final held-out loss as a ratio to plain
AdamW on the fault-free run of the same task and seed.

Model families (CPU-sized):

- ``mlp``: :class:`~stableopt.bench.faults.RegressionTask` (a tanh MLP, MSE).
- ``lm``: :class:`TokenTask`, a 2-layer ``nn.TransformerEncoder`` (d=32, vocab 64,
  length 16) learning a noisy copy language (cross-entropy).

The faults come from :mod:`stableopt.bench.faults` (:class:`FaultSchedule`,
:class:`FaultInjector`); the few that do not exist there for token data are
made here, at the same point of the step: ``inf_loss`` on the LM sets one logit
to ``+inf`` (an fp16-style overflow on a bad batch), ``poison_batch`` on the LM
gives the batch random targets with a loss weight of ``poison_scale`` (a
mislabelled batch with a broken sample weight: huge but finite gradients), and
``grad_spike`` multiplies the gradients by a per-step factor in [1e3, 1e6].
"""

from __future__ import annotations

import copy
import math
import random
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.optim import Optimizer

from stableopt.bench.faults import FaultInjector, FaultKind, FaultSchedule, RegressionTask
from stableopt.errors import DivergenceError
from stableopt.loss import SafeLoss
from stableopt.monitor import Monitor
from stableopt.optimizer import SafeOptimizer

__all__ = [
    "ABLATIONS",
    "BASELINES",
    "FAMILIES",
    "METHODS",
    "SCENARIOS",
    "Cell",
    "RunRecord",
    "StabilityConfig",
    "StabilityResult",
    "TokenTask",
    "olmo_status",
    "run_stability",
    "summarize",
]

_STRIDE = 1_000_003


# -- the token task ---------------------------------------------------------------


class _TinyLM(nn.Module):
    """Embedding + learned positions + 2-layer TransformerEncoder; logits as ``(B, V, T)``."""

    def __init__(self, vocab: int, d_model: int, seq_len: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(seq_len, d_model) * 0.1)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=2, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.encoder(h)).transpose(1, 2)


@dataclass(frozen=True)
class TokenTask:
    """A learnable synthetic language, a noisy copy: ``y[t] = x[t]``, each target token
    replaced by a random one with probability ``noise``.

    The batch of a step depends on ``(seed, step)`` only. With ``mismatch > 0`` that
    share of the batches has a target ``1..3`` tokens longer or shorter than the model's
    output (a seq2seq decoder that stopped early or late): the loss then has to trim.
    """

    vocab: int = 64
    seq_len: int = 16
    d_model: int = 32
    layers: int = 2
    batch_size: int = 16
    noise: float = 0.1
    mismatch: float = 0.0
    seed: int = 0

    def _sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randint(0, self.vocab, (n, self.seq_len), generator=generator)
        y = x.clone()
        flip = torch.rand(y.shape, generator=generator) < self.noise
        y = torch.where(flip, torch.randint(0, self.vocab, y.shape, generator=generator), y)
        return x, y

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(self.seed * _STRIDE + step)
        x, y = self._sample(self.batch_size, generator)
        if self.mismatch > 0 and torch.rand((), generator=generator) < self.mismatch:
            k = int(torch.randint(1, 4, (), generator=generator))
            if torch.rand((), generator=generator) < 0.5:
                y = y[:, :-k]
            else:
                extra = torch.randint(0, self.vocab, (y.shape[0], k), generator=generator)
                y = torch.cat([y, extra], dim=1)
        return x, y

    def held_out(self, n: int = 512) -> tuple[Tensor, Tensor]:
        return self._sample(n, torch.Generator().manual_seed(self.seed * _STRIDE + _STRIDE - 1))

    def make_model(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return _TinyLM(self.vocab, self.d_model, self.seq_len, self.layers)


class _WeightedLoss(nn.Module):
    """The task's loss times a per-batch weight (1 except on poisoned LM batches)."""

    def __init__(self, base: Callable[[Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        self.base = base
        self.weight = 1.0

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        loss = self.base(pred, target)
        return loss * self.weight if self.weight != 1.0 else loss


# -- families and scenarios -------------------------------------------------------


@dataclass(frozen=True)
class Family:
    name: str
    steps: int
    lr: float
    make_task: Callable[..., RegressionTask | TokenTask]
    base_loss: Callable[[Tensor, Tensor], Tensor]


FAMILIES: dict[str, Family] = {
    "mlp": Family("mlp", 300, 1e-2, RegressionTask, F.mse_loss),
    "lm": Family("lm", 200, 1e-2, TokenTask, F.cross_entropy),
}


@dataclass(frozen=True)
class Scenario:
    """A fault (``kind`` at ``rate`` of the steps), a setting or a task change."""

    name: str
    description: str
    kind: FaultKind | None = None
    rate: float = 0.0
    lr_factor: float = 1.0
    task_options: dict[str, dict[str, float]] = field(default_factory=dict)  # family -> kwargs
    families: tuple[str, ...] = ("mlp", "lm")
    #: the reference run (plain AdamW, no faults) uses this scenario's task, not the clean one
    own_reference: bool = False
    #: the LR schedule every method runs under: ``"cosine"`` (5% linear warm-up, then cosine
    #: decay to 10% of the peak, what most runs use) or ``"constant"``
    lr_schedule: str = "cosine"
    #: training steps per family, where this scenario needs its own run length
    steps: dict[str, int] = field(default_factory=dict)

    def schedule(self, steps: int, seed: int) -> FaultSchedule:
        if self.kind is None:
            return FaultSchedule()
        count = max(1, round(self.rate * steps))
        picked = random.Random(seed * _STRIDE + len(self.name)).sample(range(1, steps + 1), count)
        return FaultSchedule(dict.fromkeys(sorted(picked), self.kind))


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("clean", "no faults"),
        Scenario("nan_grad", "1% of gradient entries NaN on 2% of steps", "nan_grad", 0.02),
        Scenario("inf_loss", "Inf loss on 2% of batches (bad batches)", "inf_loss", 0.02),
        Scenario(
            "grad_spike", "gradients x1e3..1e6 (log-uniform) on 1% of steps", "grad_spike", 0.01
        ),
        Scenario(
            "poison",
            "poisoned batches on 2% of steps (MLP: targets x1e4; LM: random targets, loss x1e4)",
            "poison_batch",
            0.02,
        ),
        Scenario("lr_10x", "learning rate 10x too high", lr_factor=10.0),
        Scenario(
            "plateau",
            "MLP only: constant LR (no schedule) for 1500 steps on noisy targets (noise 0.5): "
            "the loss stalls at the floor the LR's noise allows; reference = plain AdamW on "
            "this task and schedule",
            task_options={"mlp": {"noise": 0.5}},
            families=("mlp",),
            own_reference=True,
            lr_schedule="constant",
            steps={"mlp": 1500},
        ),
        Scenario(
            "seq_mismatch",
            "LM only: 25% of batches have targets 1-3 tokens longer/shorter than the output; "
            "plain methods trim by hand, SafeOptimizer uses SafeLoss",
            task_options={"lm": {"mismatch": 0.25}},
            families=("lm",),
        ),
    )
}


# -- methods ----------------------------------------------------------------------


def _trim(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """The hand-written length fix of the plain methods: cut both to the shorter time axis."""
    n = min(pred.shape[-1], target.shape[-1])
    return pred[..., :n], target[..., :n]


class _Runner:
    """One method on one model: its optimizer, its loss and what a step does."""

    name = ""

    def __init__(self, model: nn.Module, lr: float, loss: _WeightedLoss) -> None:
        self.model = model
        self.params = list(model.parameters())
        self.base_loss = loss
        self.optimizer: Optimizer = self.make_optimizer(lr)
        self.skipped = 0

    def make_optimizer(self, lr: float) -> Optimizer:
        return torch.optim.AdamW(self.params, lr=lr)

    @property
    def inner(self) -> Optimizer:
        return self.optimizer

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return self.base_loss(*_trim(pred, target))

    def step(self, loss: Tensor) -> None:
        self.optimizer.step()

    def counters(self) -> tuple[int, int, int]:
        """(steps skipped, rollbacks, LR cuts)."""
        return self.skipped, 0, 0


class _Plain(_Runner):
    name = "adamw"


class _Clip(_Runner):
    name = "adamw+clip"

    def step(self, loss: Tensor) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()


class _ClipSkip(_Runner):
    name = "adamw+clip+skip"

    def step(self, loss: Tensor) -> None:
        norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        if not (math.isfinite(float(loss.detach())) and math.isfinite(float(norm))):
            self.skipped += 1
            self.optimizer.zero_grad()
            return
        self.optimizer.step()


class _ZClip(_Runner):
    name = "zclip"

    def __init__(self, model: nn.Module, lr: float, loss: _WeightedLoss) -> None:
        from zclip import ZClip

        super().__init__(model, lr, loss)
        self.zclip = ZClip()  # the package's defaults (alpha 0.97, z 2.5, max_grad_norm 1.0)

    def step(self, loss: Tensor) -> None:
        self.zclip.step(self.model)
        self.optimizer.step()


class _AutoClip(_Runner):
    """AutoClip (Seetharaman et al. 2020): clip to the 10th percentile of all past norms."""

    name = "autoclip"

    def __init__(self, model: nn.Module, lr: float, loss: _WeightedLoss) -> None:
        super().__init__(model, lr, loss)
        self.history: list[float] = []

    def step(self, loss: Tensor) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        self.history.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        threshold = float(torch.tensor(self.history).quantile(0.1))
        torch.nn.utils.clip_grad_norm_(self.params, threshold)
        self.optimizer.step()


class _Olmo(_Runner):
    """OLMo-core's SkipStepAdamW, fed the loss and the pre-clip norm as its trainer does
    (``clip_grad_norm_(1.0)``, then ``latest_loss`` / ``latest_grad_norm`` before ``step``)."""

    name = "olmo-skipstep"

    def make_optimizer(self, lr: float) -> Optimizer:
        from olmo_core.optim import SkipStepAdamW

        optimizer: Optimizer = SkipStepAdamW(self.params, lr=lr)
        return optimizer

    def step(self, loss: Tensor) -> None:
        norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        opt: Any = self.optimizer
        opt.latest_loss = loss.detach()
        opt.latest_grad_norm = norm.detach()
        opt.step()
        self.skipped += int(float(opt.step_skipped))


class _Safe(_Runner):
    name = "safe"
    options: dict[str, Any] = {}

    def make_optimizer(self, lr: float) -> Optimizer:
        self.safe = SafeOptimizer(
            torch.optim.AdamW(self.params, lr=lr),
            monitor=Monitor(max_events=1_000_000),
            **copy.deepcopy(self.options),  # stage objects hold state: a fresh copy per run
        )
        self.safe_loss = SafeLoss(self.base_loss, optimizer=self.safe)
        return self.safe

    @property
    def inner(self) -> Optimizer:
        return self.safe.optimizer

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return self.safe_loss(pred, target)  # type: ignore[no-any-return]

    def counters(self) -> tuple[int, int, int]:
        stats = self.safe.stats()
        cuts = sum(e.kind in ("lr_cut", "plateau") for e in self.safe.events())
        return int(stats["skipped_steps"]), int(stats["rollbacks"]), cuts


def _safe_variant(name: str, **options: Any) -> type[_Runner]:
    variant: type[_Runner] = type(f"_Safe_{name}", (_Safe,), {"name": name, "options": options})
    return variant


BASELINES: tuple[type[_Runner], ...] = (_Plain, _Clip, _ClipSkip, _ZClip, _AutoClip, _Olmo)
ABLATIONS: tuple[type[_Runner], ...] = (
    _safe_variant("safe-no_clip", clip=None),
    _safe_variant("safe-no_spike", spike=None),
    _safe_variant("safe-no_emergency_lr", emergency_lr=None),
    _safe_variant("safe-no_plateau", plateau=None),
    _safe_variant("safe-no_rollback", rollback=None),
    _safe_variant("safe-check_weights_off", check_weights="off"),
)
_ALL: tuple[type[_Runner], ...] = (*BASELINES, _Safe, *ABLATIONS)
METHODS: dict[str, type[_Runner]] = {m.name: m for m in _ALL}


def olmo_status() -> str | None:
    """``None`` when OLMo-core's SkipStepAdamW can be used here, else why not."""
    try:
        from olmo_core.optim import SkipStepAdamW

        SkipStepAdamW([nn.Parameter(torch.zeros(1))], lr=1e-3)
    except Exception as error:  # any failure to import or build: report it, do not fake it
        return f"{type(error).__name__}: {error}"
    return None


def zclip_status() -> str | None:
    """``None`` when the ``zclip`` package can be used here, else why not."""
    try:
        from zclip import ZClip

        ZClip()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def unavailable_methods() -> dict[str, str]:
    """Baselines whose package is missing here (``pip install -e ".[bench]"``), and why."""
    status = {"olmo-skipstep": olmo_status(), "zclip": zclip_status()}
    return {method: why for method, why in status.items() if why is not None}


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
        if self.diverged or not math.isfinite(self.held_out):
            return math.inf
        return self.held_out / self.reference


class _Injector(FaultInjector):
    """:class:`FaultInjector` plus a per-step spike factor in [1e3, 1e6]."""

    def corrupt_grads(self, params: Iterable[Tensor]) -> None:
        if self.fault != "grad_spike":
            super().corrupt_grads(params)
            return
        step = self._step
        factor = 10.0 ** random.Random(self.seed * _STRIDE + step).uniform(3.0, 6.0)
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(factor)
        self.injected.append((step, "grad_spike"))


def _task(family: Family, scenario: Scenario, seed: int) -> RegressionTask | TokenTask:
    return family.make_task(seed=seed, **scenario.task_options.get(family.name, {}))


def _held_out(
    model: nn.Module, task: RegressionTask | TokenTask, base: Callable[..., Tensor]
) -> float:
    with torch.no_grad():
        x, y = task.held_out()
        return float(base(model(x), y))


def _lr_multiplier(schedule: str, steps: int) -> Callable[[int], float]:
    """``LambdaLR``'s multiplier of step ``t`` (0-based) for ``schedule`` over ``steps`` steps."""
    if schedule == "constant":
        return lambda t: 1.0
    warmup = max(1, steps // 20)

    def cosine(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        progress = min(1.0, (t - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return cosine


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
        runner.optimizer, _lr_multiplier(scenario.lr_schedule, steps)
    )
    schedule = scenario.schedule(steps, seed) if family.name in scenario.families else None
    schedule = schedule or FaultSchedule()
    is_lm = isinstance(task, TokenTask)
    error = ""
    with _Injector(schedule, runner.optimizer, seed=seed) as injector:
        for step in range(1, steps + 1):
            fault = injector.begin_step(step)
            x, y = task.batch(step)
            loss_module.weight = 1.0
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
    held_out = _held_out(model, task, family.base_loss)
    skipped, rollbacks, cuts = runner.counters()
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

    logging.getLogger("stableopt").setLevel(logging.ERROR)  # events are counted, not printed
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


# -- summary ----------------------------------------------------------------------


@dataclass
class Cell:
    """One (family, scenario, method) over its seeds."""

    family: str
    scenario: str
    method: str
    seeds: int
    diverged: int
    ratio_median: float
    ratio_min: float
    ratio_max: float
    skipped: float
    rollbacks: float
    lr_cuts: float


def summarize(records: Sequence[RunRecord]) -> list[Cell]:
    groups: dict[tuple[str, str, str], list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.family, r.scenario, r.method), []).append(r)
    cells = []
    for (family, scenario, method), rs in groups.items():
        ratios = [r.ratio for r in rs]
        cells.append(
            Cell(
                family,
                scenario,
                method,
                len(rs),
                sum(r.diverged for r in rs),
                statistics.median(ratios),
                min(ratios),
                max(ratios),
                statistics.median(r.skipped for r in rs),
                statistics.median(r.rollbacks for r in rs),
                statistics.median(r.lr_cuts for r in rs),
            )
        )
    return cells


# -- report -----------------------------------------------------------------------

HEADLINE = ("adamw", "adamw+clip", "adamw+clip+skip", "zclip", "autoclip", "olmo-skipstep", "safe")
SURVIVE_WITHIN = 1.05  # SafeOptimizer's target: every scenario within 5% of the clean run
CLEAN_WITHIN = 0.01  # and on the clean scenario within 1% of plain AdamW


def _fmt_cell(cell: Cell | None) -> str:
    if cell is None:
        return "–"
    if cell.diverged == cell.seeds:
        return f"**diverged** {cell.diverged}/{cell.seeds}"
    text = f"{_num(cell.ratio_median)} [{_num(cell.ratio_min)}–{_num(cell.ratio_max)}]"
    if cell.diverged:
        text += f" **{cell.diverged}/{cell.seeds} div**"
    return text


def _num(x: float) -> str:
    if math.isinf(x):
        return "inf"
    return f"{x:.3f}" if x < 100 else f"{x:.3g}"


def _table(cells: list[Cell], methods: Sequence[str], rows: list[tuple[str, str]]) -> list[str]:
    index = {(c.family, c.scenario, c.method): c for c in cells}
    methods = [m for m in methods if any(c.method == m for c in cells)]
    lines = [
        "| family | scenario | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for family, scenario in rows:
        row = [_fmt_cell(index.get((family, scenario, m))) for m in methods]
        lines.append(f"| {family} | {scenario} | " + " | ".join(row) + " |")
    return lines


def target_verdicts(cells: list[Cell]) -> list[tuple[str, str, bool, str]]:
    """(family, scenario, met, why) for SafeOptimizer with defaults."""
    verdicts = []
    for c in cells:
        if c.method != "safe":
            continue
        if c.diverged:
            verdicts.append(
                (c.family, c.scenario, False, f"diverged in {c.diverged}/{c.seeds} seeds")
            )
        elif c.scenario == "clean":
            worst = max(abs(c.ratio_min - 1), abs(c.ratio_max - 1))
            ok = worst <= CLEAN_WITHIN
            verdicts.append((c.family, c.scenario, ok, f"worst seed {worst:+.2%} off plain AdamW"))
        else:
            ok = c.ratio_max <= SURVIVE_WITHIN
            verdicts.append(
                (c.family, c.scenario, ok, f"worst seed ratio {_num(c.ratio_max)} (target <= 1.05)")
            )
    return verdicts


def format_markdown(result: StabilityResult) -> str:
    import platform

    cells = summarize(result.records)
    rows = list(dict.fromkeys((c.family, c.scenario) for c in cells))
    config = result.config
    lines = [
        "# Stability benchmark",
        "",
        f"- command: `{result.command or 'run_stability(...)'}`",
        f"- run time: {result.seconds:.0f} s ({config.jobs} worker process(es), {config.threads} torch thread(s) each)",
        f"- machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{_cpu_count()} CPU cores (shared with other jobs while this ran)",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- seeds: {config.seeds} (0..{config.seeds - 1}); steps: "
        + ", ".join(
            f"{f} {(config.steps or {}).get(f, FAMILIES[f].steps)}" for f in config.families
        ),
        "- families: `mlp` = RegressionTask (tanh MLP 8-32-32-1, MSE, batch 64, AdamW lr 1e-2); "
        "`lm` = 2-layer TransformerEncoder, d=32, vocab 64, seq 16, noisy copy language "
        "(10% random targets), cross-entropy, batch 16, AdamW lr 1e-2",
        "- every method runs under the same LR schedule: 5% linear warm-up, cosine decay to "
        "10% of the peak (the `plateau` scenario: constant LR), stepped every loop step, "
        "skipped steps included",
        "- baselines: `adamw+clip` = `clip_grad_norm_(1.0)`; `adamw+clip+skip` also skips a "
        "step whose loss or norm is not finite; `zclip` = the `zclip` package's `ZClip()` "
        "defaults; `autoclip` = clip to the 10th percentile of all past norms; "
        "`olmo-skipstep` = OLMo-core's `SkipStepAdamW` fed the loss and the pre-clip norm "
        "after `clip_grad_norm_(1.0)`, as its trainer does",
        *(f"- **{m} not run**: {why}" for m, why in result.unavailable.items()),
        "",
        "Each cell: final held-out loss / held-out loss of plain AdamW on the clean run of the "
        "same task and seed (the `plateau` scenario: plain AdamW on the plateau task), "
        "median [min–max] over seeds. **diverged**: non-finite final loss or DivergenceError "
        "(ratio inf). Lower is better; 1.000 = as good as a fault-free plain run.",
        "",
        "## Scenarios",
        "",
    ]
    for s in config.scenarios:
        lines.append(f"- `{s}`: {SCENARIOS[s].description}")
    lines += ["", "## Target: SafeOptimizer (defaults) survives and ends within 5% (clean: 1%)", ""]
    verdicts = target_verdicts(cells)
    lines += ["| family | scenario | met | detail |", "|---|---|---|---|"]
    for family, scenario, ok, why in verdicts:
        lines.append(f"| {family} | {scenario} | {'yes' if ok else '**NO**'} | {why} |")
    missed = [v for v in verdicts if not v[2]]
    lines += [
        "",
        f"Met in {len(verdicts) - len(missed)} of {len(verdicts)} cells."
        + (" Missed: " + ", ".join(f"{f}/{s}" for f, s, _, _ in missed) + "." if missed else ""),
        "",
        "## SafeOptimizer vs the alternatives (loss ratio)",
        "",
    ]
    lines += _table(cells, HEADLINE, rows)
    lines += ["", "## Ablation: SafeOptimizer with one stage off (loss ratio)", ""]
    lines += _table(cells, ["safe"] + [m.name for m in ABLATIONS], rows)
    lines += [
        "",
        "## Interventions (median per run: steps skipped / rollbacks / LR cuts)",
        "",
    ]
    index = {(c.family, c.scenario, c.method): c for c in cells}
    counted = [
        m for m in ("adamw+clip+skip", "olmo-skipstep", "safe", *[a.name for a in ABLATIONS])
    ]
    counted = [m for m in counted if any(c.method == m for c in cells)]
    lines += [
        "| family | scenario | " + " | ".join(counted) + " |",
        "|---|---|" + "---|" * len(counted),
    ]
    for family, scenario in rows:
        row = []
        for m in counted:
            c = index.get((family, scenario, m))
            row.append("–" if c is None else f"{c.skipped:g} / {c.rollbacks:g} / {c.lr_cuts:g}")
        lines.append(f"| {family} | {scenario} | " + " | ".join(row) + " |")
    errors = sorted({(r.family, r.scenario, r.method, r.error) for r in result.records if r.error})
    if errors:
        lines += ["", "## DivergenceErrors", ""]
        lines += [f"- {f}/{s}/{m}: {e}" for f, s, m, e in errors[:40]]
    return "\n".join(lines) + "\n"


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 0


def write_results(result: StabilityResult, out: str, stem: str = "stability") -> list[str]:
    """Write ``<stem>.md``, ``<stem>.csv`` and (with matplotlib) ``<stem>.png`` under ``out``."""
    import csv
    from pathlib import Path

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    md = folder / f"{stem}.md"
    body = format_markdown(result)
    png = _plot(result, folder / f"{stem}.png")
    if png:
        body += f"\n![loss ratio per scenario and method]({Path(png).name})\n"
    md.write_text(body)
    written.append(str(md))
    path = folder / f"{stem}.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "family",
                "scenario",
                "method",
                "seed",
                "held_out_loss",
                "reference_loss",
                "ratio",
                "diverged",
                "steps_skipped",
                "rollbacks",
                "lr_cuts",
                "error",
            ]
        )
        for r in result.records:
            writer.writerow(
                [
                    r.family,
                    r.scenario,
                    r.method,
                    r.seed,
                    f"{r.held_out:.6g}",
                    f"{r.reference:.6g}",
                    f"{r.ratio:.6g}",
                    int(r.diverged),
                    r.skipped,
                    r.rollbacks,
                    r.lr_cuts,
                    r.error,
                ]
            )
    written.append(str(path))
    if png:
        written.append(png)
    return written


def _plot(result: StabilityResult, path: Any) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cells = summarize(result.records)
    rows = list(dict.fromkeys((c.family, c.scenario) for c in cells))
    methods = list(dict.fromkeys(c.method for c in cells))
    index = {(c.family, c.scenario, c.method): c for c in cells}
    data = torch.full((len(rows), len(methods)), math.nan)
    for i, (f, s) in enumerate(rows):
        for j, m in enumerate(methods):
            c = index.get((f, s, m))
            if c is not None and math.isfinite(c.ratio_median):
                data[i, j] = math.log10(max(c.ratio_median, 1e-3))
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(methods), 1.2 + 0.4 * len(rows)))
    cmap = plt.get_cmap("RdYlGn_r").with_extremes(bad="black")
    image = ax.imshow(data.numpy(), cmap=cmap, vmin=-0.5, vmax=1.0, aspect="auto")
    for i, (f, s) in enumerate(rows):
        for j, m in enumerate(methods):
            c = index.get((f, s, m))
            if c is None:
                continue
            text = "div" if c.diverged == c.seeds else _num(c.ratio_median)[:5]
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=6,
                color="white" if c.diverged == c.seeds else "black",
            )
    ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), [f"{f}/{s}" for f, s in rows], fontsize=7)
    fig.colorbar(image, ax=ax, label="log10 median loss ratio (black: diverged)")
    ax.set_title("held-out loss / clean plain AdamW", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)

"""Per-step overhead of :class:`~stableopt.SafeOptimizer`: ``python -m stableopt bench --perf``.

The bar (DESIGN.md, Performance) is what a careful user writes by hand:
``X`` + ``torch.nn.utils.clip_grad_norm_``. For every inner optimizer ``X``
(SGD with momentum, Adam, AdamW), implementation (for-loop, foreach, fused) and
model size, one process times, interleaved:

* ``X`` alone and ``X`` + ``clip_grad_norm_(params, 1.0)`` (the baseline);
* ``SafeOptimizer(X)`` with every stage off ("guard only": the non-finite skip,
  which is always on), then with one stage on at a time, then with the defaults;
* each clip policy (a fixed max norm, ``"zscore"``, ``"percentile"``, ``"agc"``)
  alone on top of the guard.

How: all methods share one model's parameters and gradient tensors; each has its
own optimizer state. Before every timed step the gradients are refilled (untimed)
with the same values for every method: a fixed random draw times a per-step
factor. Only the optimizer part is timed (``time.perf_counter``, with
``torch.cuda.synchronize`` around it on a GPU): ``opt.step()``, plus
``clip_grad_norm_`` for the baseline, plus ``opt.observe_loss(loss)`` for every
SafeOptimizer variant. After warm-up steps, every round runs each method once in a
shuffled order, so drift and noise hit all of them alike; the garbage collector
is off while timing. A ratio is ``median(method) / median(X + clip_grad_norm_)``;
its spread is the interquartile range of the per-round ratios.

Memory: tensor bytes, not process RSS. Persistent bytes are counted
(``numel * element_size``) over the parameters, gradients, the inner optimizer's
state and every tensor the SafeOptimizer stages hold (the rollback snapshot, the
histories); the transient peak of one step comes from the profiler's allocation
events on the CPU and from ``torch.cuda.max_memory_allocated`` on a GPU, where
blocking syncs per step are also counted (``torch.cuda.set_sync_debug_mode``).
"""

from __future__ import annotations

import gc
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from benchmarks.perf_memory import (
    count_syncs,
    optimizer_state_bytes,
    tensor_bytes,
    tensors_in,
    transient_peak,
)
from stableopt.optimizer import SafeOptimizer

__all__ = [
    "DEFAULT_SIZES",
    "IMPLS",
    "METHODS",
    "OPTIMIZERS",
    "Method",
    "PerfConfig",
    "PerfResult",
    "PerfRow",
    "parse_size",
    "perf_model",
    "run_perf",
    "size_label",
]

DEFAULT_SIZES = (1_000_000, 10_000_000, 50_000_000)
QUICK_SIZES = (100_000,)
OPTIMIZERS = ("sgd", "adam", "adamw")
IMPLS = ("forloop", "foreach", "fused")
#: max_norm of the clip_grad_norm_ baseline and of the fixed policy; the gradients
#: are drawn with a total norm around it, so about half of the steps clip.
CLIP_MAX_NORM = 1.0
#: Targets of the issue: SafeOptimizer(X) per step at most this times X + clip_grad_norm_.
TIME_TARGET = {"fused": 1.0, "other": 1.05}
#: Peak memory may exceed its limit by this much: the step's 0-dim decision tensors
#: (norms, flags, coefficients) take a few hundred bytes, below what matters here.
MEMORY_SLACK_BYTES = 1024

_OFF: dict[str, Any] = {
    "clip": None,
    "emergency_clip": None,
    "spike": None,
    "emergency_lr": None,
    "plateau": None,
    "rollback": None,
    "check_weights": "off",
}


@dataclass(frozen=True)
class Method:
    """One way of stepping: ``kind`` is ``"bare"``, ``"clip"`` or ``"safe"`` (SafeOptimizer(**options))."""

    name: str
    label: str
    kind: str
    group: str
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def has_target(self) -> bool:
        """Whether the issue's per-step target applies (the defaults and every clip policy)."""
        return self.name == "defaults" or self.group == "policy"

    @property
    def has_rollback(self) -> bool:
        return self.kind == "safe" and self.options.get("rollback", "default") is not None


METHODS: tuple[Method, ...] = (
    Method("bare", "X", "bare", "baseline"),
    Method("clip", "X + clip_grad_norm_", "clip", "baseline"),
    Method("guard", "guard only", "safe", "stage", _OFF),
    Method("zscore", "clip zscore", "safe", "policy", {**_OFF, "clip": "zscore"}),
    Method(
        "emergency_clip",
        "zscore + emergency_clip",
        "safe",
        "stage",
        {**_OFF, "clip": "zscore", "emergency_clip": "default"},
    ),
    Method("spike", "spike", "safe", "stage", {**_OFF, "spike": "default"}),
    Method("emergency_lr", "emergency_lr", "safe", "stage", {**_OFF, "emergency_lr": "default"}),
    Method("plateau", "plateau", "safe", "stage", {**_OFF, "plateau": "default"}),
    Method("rollback", "rollback", "safe", "stage", {**_OFF, "rollback": "default"}),
    Method(
        "check_weights",
        "check_weights every_step",
        "safe",
        "stage",
        {**_OFF, "check_weights": "every_step"},
    ),
    Method("defaults", "defaults", "safe", "defaults"),
    # the defaults with the cheaper weight checks (explicit options, see weight_check)
    Method(
        "defaults_params", "defaults, params check", "safe", "mode", {"check_weights": "params"}
    ),
    Method("defaults_lazy", "defaults, lazy check", "safe", "mode", {"check_weights": "lazy"}),
    Method(
        "fixed", f"fixed {CLIP_MAX_NORM:.1f}", "safe", "policy", {**_OFF, "clip": CLIP_MAX_NORM}
    ),
    Method("percentile", "clip percentile", "safe", "policy", {**_OFF, "clip": "percentile"}),
    Method("agc", "clip agc", "safe", "policy", {**_OFF, "clip": "agc"}),
)


@dataclass(frozen=True)
class PerfConfig:
    """What to measure. ``rounds``/``warmup`` of ``None`` scale with the model size."""

    sizes: tuple[int, ...] = DEFAULT_SIZES
    optimizers: tuple[str, ...] = OPTIMIZERS
    impls: tuple[str, ...] = IMPLS
    rounds: int | None = None
    warmup: int | None = None
    threads: int | None = 1
    device: str = "cpu"
    blocks: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name, values, accepted in (
            ("optimizers", self.optimizers, OPTIMIZERS),
            ("impls", self.impls, IMPLS),
        ):
            unknown = sorted(set(values) - set(accepted))
            if unknown or not values:
                raise ValueError(f"{name} must be a non-empty subset of {accepted}, got {values}")
        if not self.sizes or min(self.sizes) < 1000:
            raise ValueError(f"sizes must be parameter counts >= 1000, got {self.sizes}")
        for name in ("rounds", "warmup", "threads"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "warmup" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'warmup' else 1}, got {value}")

    def rounds_for(self, n_params: int) -> int:
        # About 1e8 parameter-steps per method, at least 5: 30 rounds at 1M, 10 at 10M,
        # 5 at 50M, which keeps the default run under 10 minutes on 2 CPU cores.
        return self.rounds or max(5, min(30, round(1e8 / n_params)))

    def warmup_for(self, n_params: int) -> int:
        # At least 2: the first step creates the state (and the first snapshot), the
        # last warm-up step is the one whose memory is profiled.
        return self.warmup if self.warmup is not None else max(2, min(5, round(5e6 / n_params)))


@dataclass
class PerfRow:
    """One method on one (size, optimizer, implementation): a row of the CSV.

    Times in milliseconds, memory in bytes; ratios are to ``X + clip_grad_norm_``.
    ``time_target``/``memory_limit`` are empty where no target applies.
    """

    size: str
    n_params: int
    n_tensors: int
    optimizer: str
    impl: str
    method: str
    label: str
    group: str
    rounds: int
    median_ms: float
    p25_ms: float
    p75_ms: float
    mean_ms: float
    ratio: float = math.nan
    ratio_p25: float = math.nan
    ratio_p75: float = math.nan
    ratio_vs_bare: float = math.nan
    time_target: float | None = None
    time_met: bool | None = None
    persistent_bytes: int = 0
    state_bytes: int = 0
    snapshot_bytes: int = 0
    history_bytes: int = 0
    transient_bytes: int | None = None
    peak_bytes: int = 0
    memory_limit: int | None = None
    memory_met: bool | None = None
    snapshot_ms: float | None = None
    interventions: int = 0
    syncs_per_step: int | None = None


@dataclass
class PerfResult:
    """Every row plus what the Markdown header needs."""

    rows: list[PerfRow]
    config: PerfConfig
    machine: dict[str, str]
    seconds: float
    command: str = ""
    notes: list[str] = field(default_factory=list)


def parse_size(text: str) -> int:
    """``"50M"``, ``"200k"`` or ``"123456"`` -> a parameter count."""
    cleaned = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(cleaned[-1:], 1)
    number = cleaned[:-1] if scale > 1 else cleaned
    try:
        value = round(float(number) * scale)
    except ValueError:
        raise ValueError(
            f"a size is a parameter count like 1M, 200k or 5000, got {text!r}"
        ) from None
    return value


def size_label(n_params: int) -> str:
    for unit, scale in (("M", 1_000_000), ("k", 1_000)):
        if n_params >= scale and n_params % (scale // 10) == 0:
            return f"{n_params / scale:g}{unit}"
    return str(n_params)


def perf_model(n_params: int, blocks: int = 8, device: str = "cpu", seed: int = 0) -> nn.Module:
    """Transformer-MLP-shaped stack of about ``n_params`` parameters, ``6 * blocks`` tensors.

    Each block is ``LayerNorm(d), Linear(d, 4d), Linear(4d, d)``: 8d^2 + 7d parameters
    in weights, biases and gains of three shapes, as a real model mixes them.
    """
    width = max(
        1,
        round(
            (-7 * blocks + math.sqrt((7 * blocks) ** 2 + 32 * blocks * n_params)) / (16 * blocks)
        ),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for _ in range(blocks):
            layers += [
                nn.LayerNorm(width),
                nn.Linear(width, 4 * width),
                nn.Linear(4 * width, width),
            ]
        return nn.Sequential(*layers).to(device)


def _inner(name: str, impl: str, params: list[Tensor]) -> Optimizer:
    variant: dict[str, Any] = {
        "forloop": {"foreach": False},
        "foreach": {"foreach": True},
        "fused": {"fused": True},
    }[impl]
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9, **variant)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3, **variant)
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, **variant)


class _Gradients:
    """The gradients of every step, the same for every method: a fixed draw times a factor."""

    def __init__(self, params: list[Tensor], steps: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        n_params = sum(p.numel() for p in params)
        scale = CLIP_MAX_NORM / math.sqrt(n_params)
        self.base = [
            (torch.randn(p.shape, generator=generator) * scale).to(p.device) for p in params
        ]
        for p in params:
            p.grad = torch.zeros_like(p)
        self.grads: list[Tensor] = [p.grad for p in params if p.grad is not None]
        rng = random.Random(seed)
        self.factors = [math.exp(rng.uniform(-0.2, 0.2)) for _ in range(steps)]
        # A slowly falling loss with noise, so that plateau scheduling keeps its LR.
        self.losses = [
            torch.tensor(
                2.0 / (1 + 0.01 * t) * (1 + 0.02 * rng.uniform(-1, 1)), device=params[0].device
            )
            for t in range(steps)
        ]

    def fill(self, step: int) -> None:
        factor = self.factors[step]
        for grad, base in zip(self.grads, self.base):
            torch.mul(base, factor, out=grad)  # one pass; a copy and a multiply would be two


def _runner(method: Method, optimizer: Optimizer, params: list[Tensor]) -> Callable[[Tensor], None]:
    if method.kind == "bare":
        return lambda loss: optimizer.step()

    if method.kind == "clip":

        def clip_step(loss: Tensor) -> None:
            torch.nn.utils.clip_grad_norm_(params, CLIP_MAX_NORM)
            optimizer.step()

        return clip_step
    assert isinstance(optimizer, SafeOptimizer)

    def safe_step(loss: Tensor) -> None:
        optimizer.observe_loss(loss)
        optimizer.step()

    return safe_step


# -- the run -----------------------------------------------------------------------


class _Progress:
    """tqdm when installed, else a line on stderr every 20 seconds."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.started = self.last_line = time.perf_counter()
        self.bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, steps: int, where: str) -> None:
        self.done += steps
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(where, refresh=False)
            self.bar.update(steps)
            return
        now = time.perf_counter()
        if now - self.last_line >= 20 or self.done == self.total:
            self.last_line = now
            print(
                f"bench --perf: {self.done}/{self.total} steps ({100 * self.done / self.total:.0f}%), "
                f"{now - self.started:.0f} s, {where}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _quantiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def _run_config(
    config: PerfConfig, n_params: int, name: str, impl: str, progress: _Progress
) -> list[PerfRow]:
    device, is_cuda = config.device, config.device == "cuda"
    model = perf_model(n_params, config.blocks, device, config.seed)
    params: list[Tensor] = list(model.parameters())
    rounds, warmup = config.rounds_for(n_params), config.warmup_for(n_params)
    gradients = _Gradients(params, warmup + rounds + 2, config.seed)
    optimizers: list[Optimizer] = []
    for method in METHODS:
        inner = _inner(name, impl, params)
        optimizers.append(
            SafeOptimizer(inner, **method.options) if method.kind == "safe" else inner
        )
    runners = [_runner(m, o, params) for m, o in zip(METHODS, optimizers)]
    times: list[list[float]] = [[] for _ in METHODS]
    transients: list[int | None] = [None for _ in METHODS]
    syncs: list[int | None] = [None for _ in METHODS]
    # The memory probe is the last warm-up step when there is one after the state exists;
    # on a GPU, probes run after the timing (they add steps, but GPU steps are cheap).
    probe_step = warmup - 1 if warmup >= 2 and not is_cuda else None
    order = list(range(len(METHODS)))
    shuffler = random.Random(config.seed)
    where = f"{size_label(n_params)} {name} {impl}"

    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for step in range(warmup + rounds):
            shuffler.shuffle(order)
            for index in order:
                gradients.fill(step)
                loss = gradients.losses[step]
                if step == probe_step:
                    transients[index] = transient_peak(lambda: runners[index](loss), device)  # noqa: B023
                    continue
                if is_cuda:
                    torch.cuda.synchronize()
                started = time.perf_counter()
                runners[index](loss)
                if is_cuda:
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - started
                if step >= warmup:
                    times[index].append(elapsed)
            progress.update(len(order), where)
    finally:
        if was_enabled:
            gc.enable()
    if probe_step is None:
        last = warmup + rounds
        for index, runner in enumerate(runners):
            gradients.fill(last)
            transients[index] = transient_peak(lambda: runner(gradients.losses[last]), device)  # noqa: B023
            if is_cuda:
                gradients.fill(last + 1)
                syncs[index] = count_syncs(lambda: runner(gradients.losses[last + 1]))  # noqa: B023

    params_bytes = tensor_bytes(params)
    rows = [
        _row(method, optimizer, method_times, transient, sync_count, is_cuda)
        for method, optimizer, method_times, transient, sync_count in zip(
            METHODS, optimizers, times, transients, syncs
        )
    ]
    for row in rows:
        row.size, row.optimizer, row.impl = size_label(n_params), name, impl
        row.n_params, row.n_tensors = sum(p.numel() for p in params), len(params)
        row.persistent_bytes += 2 * params_bytes  # the parameters and their gradients
        row.peak_bytes = row.persistent_bytes + (row.transient_bytes or 0)
    _compare(rows, times, impl, params_bytes)
    return rows


def _row(
    method: Method,
    optimizer: Optimizer,
    times: list[float],
    transient: int | None,
    syncs: int | None,
    is_cuda: bool,
) -> PerfRow:
    """One method's numbers, less what the configuration fills in."""
    inner = optimizer.optimizer if isinstance(optimizer, SafeOptimizer) else optimizer
    state_bytes = optimizer_state_bytes(inner)
    snapshot_bytes = history_bytes = interventions = 0
    snapshot_ms = None
    if isinstance(optimizer, SafeOptimizer):
        rollback = optimizer.rollback
        if rollback is not None:
            # Also brings the snapshot to its steady size: the first one, taken before
            # the first step, holds no optimizer state yet.
            snapshot_ms = _time_snapshot(lambda: rollback.take(inner, 0), is_cuda)
        snapshot_bytes = tensor_bytes(tensors_in(rollback))
        stages = [s for k, s in optimizer._stages().items() if k != "rollback"]
        history_bytes = tensor_bytes(tensors_in([stages, optimizer.last_verdict]))
        counters = optimizer.monitor.counters
        interventions = counters["skipped_steps"] + counters["rollbacks"]
    q1, median, q3 = _quantiles(times)
    return PerfRow(
        size="",
        n_params=0,
        n_tensors=0,
        optimizer="",
        impl="",
        method=method.name,
        label=method.label,
        group=method.group,
        rounds=len(times),
        median_ms=1e3 * median,
        p25_ms=1e3 * q1,
        p75_ms=1e3 * q3,
        mean_ms=1e3 * statistics.fmean(times),
        persistent_bytes=state_bytes + snapshot_bytes + history_bytes,
        state_bytes=state_bytes,
        snapshot_bytes=snapshot_bytes,
        history_bytes=history_bytes,
        transient_bytes=transient,
        snapshot_ms=snapshot_ms,
        interventions=interventions,
        syncs_per_step=syncs,
    )


def _time_snapshot(take: Callable[[], None], is_cuda: bool) -> float:
    durations = []
    for _ in range(3):
        started = time.perf_counter()
        take()
        if is_cuda:
            torch.cuda.synchronize()
        durations.append(time.perf_counter() - started)
    return 1e3 * statistics.median(durations)


def _compare(rows: list[PerfRow], times: list[list[float]], impl: str, params_bytes: int) -> None:
    """Fill in the ratios to X + clip_grad_norm_ and to X, and the targets."""
    by_name = {row.method: row for row in rows}
    clip, bare = by_name["clip"], by_name["bare"]
    clip_times = times[[m.name for m in METHODS].index("clip")]
    target = TIME_TARGET["fused" if impl == "fused" else "other"]
    for method, row, method_times in zip(METHODS, rows, times):
        row.ratio = row.median_ms / clip.median_ms
        row.ratio_vs_bare = row.median_ms / bare.median_ms
        paired = [t / c for t, c in zip(method_times, clip_times)]
        row.ratio_p25, _, row.ratio_p75 = _quantiles(paired)
        if method.has_target:
            row.time_target = target
            row.time_met = row.ratio <= target
        if method.kind == "safe":
            # The documented snapshot (one copy of the parameters and the inner state)
            # and, as DESIGN.md allows, the stages' history buffers.
            documented = params_bytes + row.state_bytes if method.has_rollback else 0
            row.memory_limit = clip.peak_bytes + documented + row.history_bytes
            row.memory_met = row.peak_bytes <= row.memory_limit + MEMORY_SLACK_BYTES


def machine_info(device: str) -> dict[str, str]:
    """CPU model, cores, threads, versions (and the GPU when measuring on one)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "cpu": cpu,
        "cores": f"{affinity} available ({os.cpu_count()} in the machine)",
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run_perf(config: PerfConfig | None = None, *, progress: bool = True) -> PerfResult:
    """Run the benchmark; print progress on stderr when ``progress``."""
    config = config or PerfConfig()
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available")
    threads_before = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    try:
        total = sum(
            len(METHODS)
            * (config.rounds_for(n) + config.warmup_for(n))
            * len(config.optimizers)
            * len(config.impls)
            for n in config.sizes
        )
        bar = _Progress(total, progress)
        rows: list[PerfRow] = []
        notes: list[str] = []
        machine = machine_info(config.device)
        for n_params in config.sizes:
            for name in config.optimizers:
                for impl in config.impls:
                    try:
                        rows += _run_config(config, n_params, name, impl, bar)
                    except RuntimeError as error:  # e.g. no fused kernel for this device
                        notes.append(f"{size_label(n_params)} {name} {impl}: not run ({error})")
                        bar.update(
                            len(METHODS)
                            * (config.rounds_for(n_params) + config.warmup_for(n_params)),
                            "",
                        )
                    gc.collect()
        bar.close()
        if hasattr(os, "getloadavg"):
            # Other processes on the machine are the main source of noise on a CPU.
            machine["load average"] = (
                f"{load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
            )
    finally:
        torch.set_num_threads(threads_before)
    return PerfResult(rows, config, machine, time.perf_counter() - started, notes=notes)

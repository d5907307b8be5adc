"""The healthy configurations of the do-no-harm benchmark.

Each :class:`HarmCase` is an ordinary, healthy training run: a task, an inner
optimizer and LR, a schedule, a loss reduction, a run length. None has a fault;
plain X trains fine on every one. They span loss reduction (mean, sum), output
scale (targets x1e-4 .. x1e4), batch size (1 .. 256), optimizers (SGD with momentum
and Nesterov, Adam, AdamW for-loop/foreach/fused, RMSprop, Adagrad, Rprop),
models (MLP, CNN with BatchNorm, LSTM, a small transformer LM), schedules
(constant, warm-up + cosine, none) and real text (the character LM on the standard
library). ``hard`` marks the configurations expected, before any run, to trip
absolute defaults (a summed loss over a big batch, raw physical units, BatchNorm +
Nesterov SGD, batch-size-1 noise, heavy-tailed labels, a gradient norm that grows
all run, the LSTM and the transformer LM): they are in the table so that a change
of defaults is judged on them. Which configurations do trip is the benchmark's
finding, not this flag.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.tasks import CharLMTask, GaussianLikelihood, Images, Regression, Task

__all__ = ["CASES", "QUICK_CASES", "HarmCase"]


@dataclass(frozen=True)
class HarmCase:
    """One healthy configuration (run for every seed, plain X and SafeOptimizer(X))."""

    name: str
    description: str
    task: Callable[..., Task]  # called with seed=...
    task_options: dict[str, Any]
    optimizer: str  # a key of benchmarks.training.INNER_OPTIMIZERS
    lr: float
    schedule: str  # constant, cosine or none
    steps: int
    reduction: str = "mean"
    #: how SafeOptimizer gets the loss: ``SafeLoss(loss, optimizer=opt)``, or
    #: ``opt.observe_loss(loss)`` where the loss is a custom objective SafeLoss would
    #: reshape (the Gaussian likelihood's two outputs against one target)
    feed: str = "safeloss"
    hard: bool = False

    def make_task(self, seed: int) -> Task:
        return self.task(seed=seed, **self.task_options)

    @property
    def model(self) -> str:
        kind = getattr(self.task, "__name__", "")
        if kind == CharLMTask.__name__:
            return str(self.task_options.get("model", "transformer"))
        return {Images.__name__: "cnn-bn"}.get(kind, "mlp")


def _mlp(
    name: str, description: str, optimizer: str, lr: float, schedule: str, **kw: Any
) -> HarmCase:
    options = {k: kw.pop(k) for k in list(kw) if k in ("batch_size", "output_scale", "t_noise")}
    return HarmCase(name, description, Regression, options, optimizer, lr, schedule, 1000, **kw)


CASES: tuple[HarmCase, ...] = (
    _mlp("mlp-adamw", "MLP regression, AdamW (foreach), batch 64", "adamw-foreach", 1e-2, "cosine"),
    _mlp(
        "mlp-adamw-forloop", "MLP, AdamW for-loop, constant LR", "adamw-forloop", 1e-2, "constant"
    ),
    _mlp("mlp-adamw-fused", "MLP, AdamW fused, no scheduler", "adamw-fused", 1e-2, "none"),
    _mlp("mlp-sgd-momentum", "MLP, SGD momentum 0.9", "sgd-momentum", 5e-2, "cosine"),
    _mlp("mlp-rmsprop", "MLP, RMSprop", "rmsprop", 1e-3, "cosine"),
    _mlp("mlp-adagrad", "MLP, Adagrad, no scheduler", "adagrad", 5e-2, "none"),
    _mlp(
        "mlp-b1-adam",
        "MLP, batch size 1 (gradient noise), Adam",
        "adam",
        1e-3,
        "cosine",
        batch_size=1,
        hard=True,
    ),
    _mlp(
        "mlp-b2-sgd",
        "MLP, batch size 2, SGD momentum, constant LR",
        "sgd-momentum",
        1e-2,
        "constant",
        batch_size=2,
        hard=True,
    ),
    _mlp(
        "mlp-sum-b256",
        'MLP, F.mse_loss(reduction="sum") over a batch of 256, AdamW',
        "adamw-foreach",
        1e-2,
        "cosine",
        batch_size=256,
        reduction="sum",
        hard=True,
    ),
    _mlp(
        "mlp-sum-b8-sgd",
        'MLP, reduction="sum" over a batch of 8, SGD momentum',
        "sgd-momentum",
        5e-3,
        "constant",
        batch_size=8,
        reduction="sum",
    ),
    _mlp(
        "mlp-x1e-4", "MLP, targets x1e-4, AdamW", "adamw-foreach", 1e-2, "cosine", output_scale=1e-4
    ),
    _mlp(
        "mlp-x1e-2-rmsprop",
        "MLP, targets x1e-2, RMSprop",
        "rmsprop",
        1e-3,
        "constant",
        output_scale=1e-2,
    ),
    _mlp("mlp-x1e2", "MLP, targets x1e2, Adam", "adam", 1e-2, "cosine", output_scale=1e2),
    _mlp(
        "mlp-x1e4",
        "MLP, targets in raw physical units (x1e4), Adam",
        "adam",
        1e-2,
        "cosine",
        output_scale=1e4,
        hard=True,
    ),
    _mlp(
        "mlp-student-t",
        "MLP, heavy-tailed label noise (0.3 x Student-t, df=2), AdamW",
        "adamw-foreach",
        1e-2,
        "cosine",
        t_noise=0.3,
        hard=True,
    ),
    HarmCase(
        "gauss-rprop-max",
        "MLP mean + log-variance, Gaussian log-likelihood maximised with Rprop(maximize=True), "
        "full batch of 256: the gradient norm grows all run (median per 100 steps 1.3 -> 9.7)",
        GaussianLikelihood,
        {"min_var": 1e-6},
        "rprop-maximize",
        1e-2,
        "none",
        1000,
        feed="observe",
        hard=True,
    ),
    HarmCase(
        "cnn-bn-sgd-nesterov",
        "CNN with BatchNorm, SGD momentum 0.9 Nesterov (wd 5e-4), lr 0.05, batch 64, "
        "warm-up + cosine",
        Images,
        {},
        "sgd-nesterov",
        5e-2,
        "cosine",
        800,
        hard=True,
    ),
    HarmCase(
        "cnn-bn-adamw-fused",
        "CNN with BatchNorm, AdamW fused",
        Images,
        {},
        "adamw-fused",
        3e-3,
        "cosine",
        800,
    ),
    HarmCase(
        "cnn-bn-b8-adam",
        "CNN with BatchNorm, batch 8 (noisy batch statistics), Adam, constant LR",
        Images,
        {"batch_size": 8},
        "adam",
        1e-3,
        "constant",
        800,
    ),
    HarmCase(
        "lstm-adam",
        "character LSTM on stdlib source, Adam",
        CharLMTask,
        {"model": "lstm"},
        "adam",
        3e-3,
        "cosine",
        800,
        hard=True,
    ),
    HarmCase(
        "lstm-sgd",
        "character LSTM on stdlib source, SGD momentum, constant LR",
        CharLMTask,
        {"model": "lstm"},
        "sgd-momentum",
        0.5,
        "constant",
        800,
    ),
    HarmCase(
        "charlm-adamw",
        "character transformer LM on stdlib source (2 layers, d=48), AdamW, warm-up + cosine",
        CharLMTask,
        {},
        "adamw-foreach",
        3e-3,
        "cosine",
        800,
        hard=True,
    ),
    HarmCase(
        "charlm-adamw-fused",
        "character transformer LM, AdamW fused, constant LR",
        CharLMTask,
        {},
        "adamw-fused",
        3e-3,
        "constant",
        800,
    ),
    HarmCase(
        "charlm-b2-adam",
        "character transformer LM, batch 2, Adam",
        CharLMTask,
        {"batch_size": 2},
        "adam",
        1e-3,
        "cosine",
        800,
        hard=True,
    ),
    HarmCase(
        "charlm-sum",
        'character transformer LM, cross_entropy(reduction="sum") over 16x32 tokens, AdamW',
        CharLMTask,
        {},
        "adamw-foreach",
        3e-3,
        "cosine",
        800,
        reduction="sum",
    ),
)

#: The ``--quick`` subset: one of each model family, a few hard ones among them.
QUICK_CASES = ("mlp-adamw", "mlp-sum-b256", "mlp-x1e4", "cnn-bn-sgd-nesterov", "charlm-adamw")

"""The tasks the do-no-harm and LR-sensitivity benchmarks train on (shared by both).

Each task gives the batch of a step from ``(seed, step)`` alone, a fixed held-out
set, a fresh model whose weights are a function of the seed, the training loss
(with a ``reduction``) and a positive held-out metric (lower is better):

- :class:`Regression`: :class:`stableopt.testing.faults.RegressionTask` (a tanh MLP on
  a seeded sine teacher) with the targets multiplied by ``output_scale`` (units),
  optional heavy-tailed label noise (Student-t), any batch size, MSE with either
  reduction. The held-out metric is the MSE on the task's own held-out set, divided
  by ``output_scale**2`` so that every scale reads alike.
- :class:`GaussianLikelihood`: the same data, the MLP predicting a mean and a
  log-variance, the objective the Gaussian log-likelihood (bounded above, maximised).
  As the predicted variance shrinks the gradient norm grows steadily: a healthy run
  whose gradient norm never stops rising. Held-out metric: MSE of the mean.
- :class:`Images`: 10-class 12x12 synthetic images (seeded class templates, random
  shifts, pixel noise) for a small CNN with BatchNorm; cross-entropy. The held-out
  metric is read in ``eval()`` mode (BatchNorm's running statistics).
- :class:`~benchmarks.tasks_text.CharLMTask`: next-character prediction on the
  standard library's source (a transformer or an LSTM).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from benchmarks.tasks_text import CharLMTask
from stableopt.testing.faults import RegressionTask, make_mlp

__all__ = ["CharLMTask", "GaussianLikelihood", "Images", "Regression", "Task", "held_out_metric"]

_STRIDE = 1_000_003


class Task(Protocol):
    """What the benchmarks need from a task."""

    @property
    def seed(self) -> int: ...

    def batch(self, step: int) -> tuple[Tensor, Tensor]: ...

    def held_out(self) -> tuple[Tensor, Tensor]: ...

    def make_model(self) -> nn.Module: ...

    def loss(self, pred: Tensor, target: Tensor, reduction: str = "mean") -> Tensor: ...

    def metric(self, pred: Tensor, target: Tensor) -> float: ...


def held_out_metric(task: Task, model: nn.Module) -> float:
    """The task's held-out metric of ``model``, read in ``eval()`` mode (then back to ``train()``)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x, y = task.held_out()
            return task.metric(model(x), y)
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class Regression:
    """MLP regression: see the module docstring.

    ``t_noise`` > 0 adds ``t_noise * StudentT(t_df)`` noise to the training targets
    (heavy-tailed label noise: df=2 has infinite variance); the held-out targets keep
    the task's own Gaussian noise (0.05), so the metric reads how well the function
    was learned. With ``full_batch`` every step sees the same batch (step 1's).
    """

    batch_size: int = 64
    output_scale: float = 1.0
    t_noise: float = 0.0
    t_df: int = 2
    full_batch: bool = False
    seed: int = 0

    def _base(self) -> RegressionTask:
        return RegressionTask(batch_size=self.batch_size, seed=self.seed)

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        x, y = self._base().batch(1 if self.full_batch else step)
        if self.t_noise > 0:
            generator = torch.Generator().manual_seed(self.seed * _STRIDE + step + 7)
            # Student-t as normal / sqrt(chi2 / df), chi2 a sum of df squared normals.
            normal = torch.randn(y.shape, generator=generator)
            chi2 = (torch.randn((self.t_df, *y.shape), generator=generator) ** 2).sum(0)
            y = y + self.t_noise * normal / torch.sqrt(chi2 / self.t_df)
        return x, y * self.output_scale

    def held_out(self) -> tuple[Tensor, Tensor]:
        x, y = self._base().held_out()
        return x, y * self.output_scale

    def make_model(self) -> nn.Module:
        return self._base().make_model()

    def loss(self, pred: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        return F.mse_loss(pred, target, reduction=reduction)

    def metric(self, pred: Tensor, target: Tensor) -> float:
        return float(F.mse_loss(pred, target)) / self.output_scale**2


@dataclass(frozen=True)
class GaussianLikelihood:
    """Heteroscedastic regression, maximised: see the module docstring.

    The objective returned by :meth:`loss` is the mean Gaussian log-likelihood
    (higher is better: train it with ``maximize=True``); the log-variance is bounded
    below at ``log(min_var)`` so that the objective is bounded above.
    """

    batch_size: int = 256
    full_batch: bool = True
    min_var: float = 1e-4
    seed: int = 0

    def _base(self) -> RegressionTask:
        return RegressionTask(batch_size=self.batch_size, seed=self.seed)

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        return self._base().batch(1 if self.full_batch else step)

    def held_out(self) -> tuple[Tensor, Tensor]:
        return self._base().held_out()

    def make_model(self) -> nn.Module:
        return make_mlp(8, 32, 2, seed=self.seed)

    def loss(self, pred: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        mean, log_var = pred[:, :1], pred[:, 1:].clamp(min=math.log(self.min_var))
        log_lik = -0.5 * (log_var + (target - mean) ** 2 / log_var.exp() + math.log(2 * math.pi))
        return log_lik.sum() if reduction == "sum" else log_lik.mean()

    def metric(self, pred: Tensor, target: Tensor) -> float:
        return float(F.mse_loss(pred[:, :1], target))


class _SmallCNN(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Linear(64, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Images:
    """10-class synthetic images for a BatchNorm CNN: see the module docstring."""

    batch_size: int = 64
    classes: int = 10
    size: int = 12
    noise: float = 2.0
    seed: int = 0

    def _templates(self) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed * _STRIDE + 11)
        coarse = torch.randn(self.classes, 1, 4, 4, generator=generator)
        return F.interpolate(coarse, size=(self.size, self.size), mode="bilinear")

    def _sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        labels = torch.randint(0, self.classes, (n,), generator=generator)
        images = self._templates()[labels]
        shifts = torch.randint(-1, 2, (2,), generator=generator)
        images = torch.roll(images, shifts=(int(shifts[0]), int(shifts[1])), dims=(2, 3))
        return images + self.noise * torch.randn(images.shape, generator=generator), labels

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        return self._sample(
            self.batch_size, torch.Generator().manual_seed(self.seed * _STRIDE + step)
        )

    def held_out(self) -> tuple[Tensor, Tensor]:
        return self._sample(1024, torch.Generator().manual_seed(self.seed * _STRIDE + _STRIDE - 1))

    def make_model(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return _SmallCNN(self.classes)

    def loss(self, pred: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        return F.cross_entropy(pred, target, reduction=reduction)

    def metric(self, pred: Tensor, target: Tensor) -> float:
        return float(F.cross_entropy(pred, target))

"""The stability benchmark's model families and scenarios: what is trained, and under what.

- ``mlp``: :class:`~stableopt.testing.faults.RegressionTask` (a tanh MLP, MSE).
- ``lm``: :class:`TokenTask`, a 2-layer ``nn.TransformerEncoder`` (d=32, vocab 64,
  length 16) learning a noisy copy language (cross-entropy).
- ``cnn``: :class:`~benchmarks.tasks.Images`, a small CNN with BatchNorm on 10-class
  synthetic images (cross-entropy), its held-out loss read in ``eval()`` mode (the
  BatchNorm running statistics a forward pass writes are part of the model).

A :class:`Scenario` is a fault (``kind`` at ``rate`` of the steps), a bad setting or a
task change; :mod:`benchmarks.stability` runs each method under each of them.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from benchmarks.tasks import Images
from stableopt.testing.faults import FaultKind, FaultSchedule, RegressionTask

__all__ = ["FAMILIES", "SCENARIOS", "Family", "Scenario", "TokenTask"]

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
        """The ``(tokens, targets)`` batch of training step ``step``."""
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
        """``n`` held-out examples, the same for every call with this seed."""
        return self._sample(n, torch.Generator().manual_seed(self.seed * _STRIDE + _STRIDE - 1))

    def make_model(self) -> nn.Module:
        """A fresh model, its initial weights fixed by the seed."""
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
    """A model family: its task, loss, training steps and peak learning rate."""

    name: str
    steps: int
    lr: float
    make_task: Callable[..., RegressionTask | TokenTask | Images]
    base_loss: Callable[[Tensor, Tensor], Tensor]
    #: the held-out loss is read in ``eval()`` mode (a model with BatchNorm)
    eval_mode: bool = False


FAMILIES: dict[str, Family] = {
    "mlp": Family("mlp", 300, 1e-2, RegressionTask, F.mse_loss),
    "lm": Family("lm", 200, 1e-2, TokenTask, F.cross_entropy),
    "cnn": Family("cnn", 300, 3e-3, Images, F.cross_entropy, eval_mode=True),
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
    #: the fault hits every ``every``-th step (7, 14, ...) instead of ``rate`` of them
    every: int = 0
    #: ``grad_spike`` multiplies by this fixed factor (default: a random one in [1e3, 1e6])
    spike_factor: float | None = None
    #: ``(share, factor)``: from ``share`` of the run to its end the training loss is
    #: multiplied by ``factor`` (a re-weighting / curriculum stage); held-out loss unscaled
    loss_scale: tuple[float, float] | None = None
    #: ``(start, length, factor)``: the scheduled LR times ``factor`` from ``start`` of the
    #: run for ``length`` of it (a bug in a hand-written schedule)
    lr_burst: tuple[float, float, float] | None = None

    def loss_weight(self, step: int, steps: int) -> float:
        """The training loss's multiplier at ``step`` (1 outside a ``loss_scale`` stage)."""
        if self.loss_scale is None:
            return 1.0
        share, factor = self.loss_scale
        return factor if step > share * steps else 1.0

    def schedule(self, steps: int, seed: int) -> FaultSchedule:
        """The fault steps of a ``steps``-step run with ``seed``: every ``every``-th step, or
        ``rate`` of them (at least 1) drawn from the seed."""
        if self.kind is None:
            return FaultSchedule()
        options = {} if self.spike_factor is None else {"spike_factor": self.spike_factor}
        if self.every:
            return FaultSchedule(
                dict.fromkeys(range(self.every, steps + 1, self.every), self.kind), **options
            )
        count = max(1, round(self.rate * steps))
        picked = random.Random(seed * _STRIDE + len(self.name)).sample(range(1, steps + 1), count)
        return FaultSchedule(dict.fromkeys(sorted(picked), self.kind), **options)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("clean", "no faults", families=("mlp", "lm", "cnn")),
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
            "lr_burst_x100",
            "the scheduled LR x100 for 5% of the run from its middle (a schedule bug)",
            lr_burst=(0.5, 0.05, 100.0),
        ),
        Scenario(
            "nan_weights",
            "an update writes NaN into one weight on 1% of steps (silent data corruption)",
            "nan_weights",
            0.01,
        ),
        Scenario(
            "nan_grad_every7",
            "1% of gradient entries NaN on every 7th step (a persistently bad kernel or rank)",
            "nan_grad",
            every=7,
        ),
        Scenario(
            "loss_x1e4_from40",
            "training loss x1e4 from 40% of the run to the end (a loss re-weighting or "
            "curriculum stage: a persistent jump in scale); held-out loss read unscaled",
            loss_scale=(0.4, 1e4),
        ),
        Scenario(
            "grad_x1e4_every6",
            "gradients x1e4 on every 6th step (a recurring gradient explosion)",
            "grad_spike",
            every=6,
            spike_factor=1e4,
        ),
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
            "nan_batch",
            "CNN only: one input value NaN on 2% of batches (the forward pass writes NaN into "
            "the BatchNorm running statistics before any optimizer step); held-out loss in "
            "eval mode",
            "nan_batch",
            0.02,
            families=("cnn",),
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

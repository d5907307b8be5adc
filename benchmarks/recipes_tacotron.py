"""NVIDIA's Tacotron 2 recipe, scaled down, on learnable synthetic text/mel pairs.

Reproduces NVIDIA/tacotron2 ``train.py`` + ``hparams.py`` + ``loss_function.py`` with the
model of :mod:`benchmarks.recipes_tacotron_model`: Adam (lr 1e-3, weight decay 1e-6,
torch's default eps 1e-8, as train.py builds it), a constant LR written into every
group before each iteration, teacher forcing, the padded frames masked
(``mask_padding``), the loss ``MSE(mel_out, mel) + MSE(mel_postnet, mel) +
BCEWithLogits(gate, gate_target)`` and ``clip_grad_norm_(model.parameters(), 1.0)``
(``grad_clip_thresh``) before ``optimizer.step()``. Batches are collated as
``TextMelCollate`` does (sorted by text length, zero-padded, the gate target 1 from the
last frame on), drawn from a fixed training set with a reshuffle every epoch.

Three situations, each its own row of the benchmark:

- ``mean``: the loss as written (mean reductions);
- ``sum``: the two mel terms with ``reduction="sum"``, as some forks write them;
- ``ddc``: Coqui TTS's double decoder consistency: a coarse decoder with reduction
  factor 2 next to the fine one (r = 1) reads the detached encoder output; the loss adds
  ``0.25 * (MSE(coarse mel, mel) + L1(alignments, stretched coarse alignments))``
  (``decoder_loss_alpha``), the coarse decoder's frames and alignment steps differing
  from the fine decoder's by design (cut and stretched, as Coqui's
  ``_coarse_decoder_pass`` does).

Data: each of 23 symbols has a mel template (a smooth random curve over the channels)
and a duration of 2-3 frames; an utterance is 3-7 symbols, its mel the templates held
for their durations, smoothed over time, plus noise 0.1 (6-21 frames): learnable
(alignment and durations), deterministic from the seed. Scaled down: embedding and
encoder 32, attention and decoder RNNs 64, prenet 32, attention 32, location filters 8
of width 15, postnet 32, 20 mel channels, batch 16 (hparams.py: 512, 1024, 256, 128, 32
of 31, 512, 80, 64). The held-out loss is the ``mean`` loss (Tacotron2Loss as written)
of 64 fixed utterances, teacher-forced, in ``eval()`` mode (the prenet's dropout stays
on, from a fixed RNG state), for every situation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from benchmarks.recipes_base import RecipeRun, Wrap, apply_wrap, check_steps, corrupt_tensor
from benchmarks.recipes_tacotron_model import Tacotron2, TacotronConfig, mask_from_lengths

__all__ = [
    "SITUATIONS",
    "MelBatch",
    "TacotronRecipe",
    "TacotronRun",
    "build_tacotron",
    "synthetic_utterances",
    "tacotron2_loss",
]

SITUATIONS = ("mean", "sum", "ddc")
_STRIDE = 1_000_003


@dataclass(frozen=True)
class TacotronRecipe:
    """hparams.py's optimisation parameters and the benchmark's data sizes."""

    model: TacotronConfig = TacotronConfig()
    learning_rate: float = 1e-3
    weight_decay: float = 1e-6
    grad_clip_thresh: float = 1.0
    batch_size: int = 16  # 64
    train_utterances: int = 512
    held_out_utterances: int = 64
    min_symbols: int = 3
    max_symbols: int = 7
    noise: float = 0.1
    ddc_r: int = 2
    decoder_loss_alpha: float = 0.25  # Coqui TTS
    steps: int = 64


class MelBatch(NamedTuple):
    """``TextMelCollate``'s batch: sorted by text length, zero-padded."""

    text: Tensor  # (B, T_in) int64, 0 = padding
    text_lengths: Tensor  # (B,)
    mels: Tensor  # (B, n_mel, T)
    gate: Tensor  # (B, T): 1 from the last frame on
    mel_lengths: Tensor  # (B,)


def synthetic_utterances(
    recipe: TacotronRecipe, seed: int, n: int, offset: int
) -> list[tuple[Tensor, Tensor]]:
    """``n`` ``(symbols, mel (n_mel, T))`` pairs; the voice (templates, durations) is a
    function of ``seed``, the utterances of ``seed`` and ``offset``."""
    c = recipe.model
    voice = torch.Generator().manual_seed(seed * _STRIDE + 17)
    coarse = torch.randn(c.n_symbols, 1, 5, generator=voice)
    templates = F.interpolate(coarse, size=c.n_mel_channels, mode="linear").squeeze(1) * 1.5
    durations = torch.randint(2, 4, (c.n_symbols,), generator=voice)
    g = torch.Generator().manual_seed(seed * _STRIDE + offset)
    smooth = torch.tensor([0.25, 0.5, 0.25]).view(1, 1, 3)
    pairs = []
    for _ in range(n):
        length = int(torch.randint(recipe.min_symbols, recipe.max_symbols + 1, (1,), generator=g))
        symbols = torch.randint(1, c.n_symbols, (length,), generator=g)
        frames = templates[symbols].repeat_interleave(durations[symbols], dim=0)  # (T, n_mel)
        frames = F.conv1d(F.pad(frames.t()[:, None, :], (1, 1), mode="replicate"), smooth).squeeze(
            1
        )
        mel = frames + recipe.noise * torch.randn(frames.shape, generator=g)
        pairs.append((symbols, mel))
    return pairs


def collate(pairs: list[tuple[Tensor, Tensor]], n_frames_per_step: int = 1) -> MelBatch:
    """``TextMelCollate``: sort by text length (descending), pad text, mels and gates."""
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]))
    text_lengths = torch.tensor([len(pairs[i][0]) for i in order])
    n_mel = pairs[0][1].shape[0]
    max_frames = max(m.shape[1] for _, m in pairs)
    max_frames += -max_frames % n_frames_per_step
    text = torch.zeros(len(pairs), int(text_lengths[0]), dtype=torch.long)
    mels = torch.zeros(len(pairs), n_mel, max_frames)
    gate = torch.zeros(len(pairs), max_frames)
    mel_lengths = torch.zeros(len(pairs), dtype=torch.long)
    for row, i in enumerate(order):
        symbols, mel = pairs[i]
        text[row, : len(symbols)] = symbols
        mels[row, :, : mel.shape[1]] = mel
        gate[row, mel.shape[1] - 1 :] = 1
        mel_lengths[row] = mel.shape[1]
    return MelBatch(text, text_lengths, mels, gate, mel_lengths)


def tacotron2_loss(out: dict[str, Tensor], batch: MelBatch, mel_reduction: str = "mean") -> Tensor:
    """loss_function.py's ``Tacotron2Loss`` (the mel terms' reduction as given)."""
    mel_loss = F.mse_loss(out["mel_out"], batch.mels, reduction=mel_reduction) + F.mse_loss(
        out["mel_postnet"], batch.mels, reduction=mel_reduction
    )
    gate_loss = F.binary_cross_entropy_with_logits(
        out["gate"].reshape(-1, 1), batch.gate.reshape(-1, 1)
    )
    return mel_loss + gate_loss


class TacotronRun(RecipeRun):
    """NVIDIA's training loop on one seed and situation (see the module docstring)."""

    def __init__(
        self,
        recipe: TacotronRecipe,
        situation: str,
        seed: int,
        *,
        wrap: Wrap | None,
        keep_clip: bool,
        steps: int,
        lr: float,
    ) -> None:
        if situation not in SITUATIONS:
            raise ValueError(f"situation must be one of {SITUATIONS}, got {situation!r}")
        self.recipe, self.situation, self.seed = recipe, situation, seed
        self.steps, self.lr = check_steps(steps), lr
        self.clip, self.keep_clip = recipe.grad_clip_thresh, keep_clip
        self.train_set = synthetic_utterances(recipe, seed, recipe.train_utterances, 1)
        self.held_out = collate(synthetic_utterances(recipe, seed, recipe.held_out_utterances, 2))
        torch.manual_seed(seed)  # hparams.seed: the weights, then dropout
        self.model: Tacotron2 = Tacotron2(recipe.model, recipe.ddc_r if situation == "ddc" else 0)
        self.inner = torch.optim.Adam(
            self.model.parameters(), lr=lr, weight_decay=recipe.weight_decay
        )
        self.optimizer, self.safe = apply_wrap(self.inner, wrap)
        self.model.train()

    def batch(self, step: int) -> MelBatch:
        """The ``step``-th batch of a loader that reshuffles the training set every epoch."""
        per_epoch = len(self.train_set) // self.recipe.batch_size
        epoch, index = divmod(step - 1, per_epoch)
        g = torch.Generator().manual_seed(self.seed * _STRIDE + 1000 + epoch)
        order = torch.randperm(len(self.train_set), generator=g)
        size = self.recipe.batch_size
        return collate([self.train_set[int(i)] for i in order[index * size : (index + 1) * size]])

    def corrupt(self, batch: MelBatch, kind: str) -> MelBatch:
        return batch._replace(mels=corrupt_tensor(batch.mels, kind))  # teacher input and target

    def loss(self, out: dict[str, Tensor], batch: MelBatch) -> Tensor:
        """The situation's training loss."""
        reduction = "sum" if self.situation == "sum" else "mean"
        loss = tacotron2_loss(out, batch, reduction)
        if self.situation == "ddc":
            pad = ~mask_from_lengths(batch.mel_lengths, batch.mels.shape[2])
            coarse = out["coarse_mel"].masked_fill(pad[:, None, :], 0.0)
            consistency = F.l1_loss(out["alignments"], out["coarse_alignments"])
            loss = loss + self.recipe.decoder_loss_alpha * (
                F.mse_loss(coarse, batch.mels) + consistency
            )
        return loss

    def train_step(self, batch: MelBatch) -> Tensor:
        """One iteration of train.py: LR write, forward, loss, backward, clip, step."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.model.zero_grad()
        out = self.model(batch.text, batch.text_lengths, batch.mels, batch.mel_lengths)
        loss = self.loss(out, batch)
        if self.safe is not None:
            self.safe.observe_loss(loss.detach())  # a three-part composition: reported
        loss.backward()
        self.clip_line(self.model.parameters())
        self.optimizer.step()
        return loss.detach()

    def held_out_loss(self) -> float:
        b = self.held_out
        out = self.model(b.text, b.text_lengths, b.mels, b.mel_lengths)
        return float(tacotron2_loss(out, b))


def build_tacotron(
    situation: str = "mean",
    seed: int = 0,
    *,
    wrap: Wrap | None = None,
    keep_clip: bool = True,
    steps: int | None = None,
    lr: float | None = None,
    recipe: TacotronRecipe | None = None,
    **model: Any,
) -> TacotronRun:
    """NVIDIA's Tacotron 2 run on ``seed`` in ``situation`` (``mean``, ``sum``, ``ddc``).

    ``wrap`` the optimizer, keep or drop ``clip_grad_norm_``; ``lr`` (default 1e-3) and
    ``steps`` as the caller wants; ``model`` overrides fields of :class:`TacotronConfig`.
    """
    recipe = recipe or TacotronRecipe()
    if model:
        recipe = replace(recipe, model=replace(recipe.model, **model))
    return TacotronRun(
        recipe,
        situation,
        seed,
        wrap=wrap,
        keep_clip=keep_clip,
        steps=recipe.steps if steps is None else steps,
        lr=recipe.learning_rate if lr is None else lr,
    )

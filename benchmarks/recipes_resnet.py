"""torchvision's classification reference, scaled down: a small ResNet on synthetic images.

Reproduces pytorch/vision ``references/classification/train.py`` for a ResNet of
torchvision's ``BasicBlock`` (3x3 conv, BatchNorm, ReLU, 3x3 conv, BatchNorm, the 1x1
conv + BatchNorm shortcut where the shape changes; Kaiming-normal ``fan_out`` conv
init, BatchNorm weight 1 and bias 0, as ``torchvision.models.resnet`` initialises):
``nn.CrossEntropyLoss()``; SGD with momentum 0.9 and the reference's weight decay; the
LR of the linear scaling rule, 0.1 x batch / 256; the LR scheduler stepped once per
epoch; ``optimizer.zero_grad(); loss.backward(); optimizer.step()`` with no gradient
clip (``--clip-grad-norm`` is off by default), so the variants that keep or move a clip
do not apply. Training batches come from a fixed training set reshuffled every epoch,
each image flipped horizontally with probability 0.5 (the train preset's flip).

Two sub-recipes (rows of the benchmark):

- ``sgd``: the reference's defaults, ``--opt sgd --wd 1e-4 --lr-scheduler steplr``
  (StepLR every third of the run, gamma 0.1; 30 of 90 epochs), no warm-up;
- ``nesterov``: ``--opt sgd_nesterov --wd 5e-4 --lr-scheduler cosineannealinglr
  --lr-warmup-epochs 1 --lr-warmup-method linear`` (LinearLR from 0.01, then
  CosineAnnealingLR over the remaining epochs, chained by SequentialLR).

Scaled down: a CIFAR-style stem (3x3 conv, no max-pool) and 3 stages of one BasicBlock
at 8, 16 and 32 channels (ResNet-18: 4 stages of 2 blocks at 64-512) on 3x16x16 images
of 10 classes, batch 64 (lr 0.025), 1,600 training images (25 steps an epoch), 512
held out. Each class is a pair of oriented colour gratings; an image is its class's
pattern at a random phase and contrast plus pixel noise: learnable, not trivial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from benchmarks.recipes_base import RecipeRun, Wrap, apply_wrap, check_steps, corrupt_tensor
from stableopt import SafeLoss

__all__ = ["SUB_RECIPES", "ImageBatch", "ResNetRecipe", "ResNetRun", "SmallResNet", "build_resnet"]

SUB_RECIPES = ("sgd", "nesterov")
_STRIDE = 1_000_003


class _BasicBlock(nn.Module):
    """torchvision's ``BasicBlock`` (expansion 1)."""

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)  # type: ignore[no-any-return]


class SmallResNet(nn.Module):
    """A 3-stage ResNet of BasicBlocks with torchvision's initialisation."""

    def __init__(self, widths: tuple[int, ...] = (8, 16, 32), classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, inplanes = [], widths[0]
        for i, planes in enumerate(widths):
            stages.append(_BasicBlock(inplanes, planes, 1 if i == 0 else 2))
            inplanes = planes
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))  # type: ignore[no-any-return]


@dataclass(frozen=True)
class ResNetRecipe:
    """train.py's arguments for one sub-recipe, and the benchmark's data sizes."""

    sub_recipe: str = "sgd"
    batch_size: int = 64
    base_lr: float = 0.1  # at batch 256 (the reference's 32 x 8 GPUs)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    widths: tuple[int, ...] = (8, 16, 32)
    classes: int = 10
    image_size: int = 16
    train_images: int = 1600
    held_out_images: int = 512
    noise: float = 1.0
    steps: int = 150

    @property
    def lr(self) -> float:
        """The linear scaling rule: ``base_lr * batch_size / 256``."""
        return self.base_lr * self.batch_size / 256


def _recipe(sub_recipe: str) -> ResNetRecipe:
    if sub_recipe not in SUB_RECIPES:
        raise ValueError(f"sub_recipe must be one of {SUB_RECIPES}, got {sub_recipe!r}")
    if sub_recipe == "nesterov":
        return ResNetRecipe("nesterov", weight_decay=5e-4)
    return ResNetRecipe()


class ImageBatch(NamedTuple):
    images: Tensor  # (B, 3, H, W)
    labels: Tensor  # (B,)


def _patterns(recipe: ResNetRecipe, seed: int) -> tuple[Tensor, Tensor]:
    """Per class: two grating wave vectors (direction x frequency) and two colours."""
    g = torch.Generator().manual_seed(seed * _STRIDE + 23)
    angles = torch.rand(recipe.classes, 2, generator=g) * math.pi
    directions = torch.stack((angles.cos(), angles.sin()), dim=-1)  # (C, 2, 2)
    frequencies = 0.5 + 1.5 * torch.rand(recipe.classes, 2, generator=g)
    colours = torch.randn(recipe.classes, 2, 3, generator=g)
    return directions * frequencies[..., None], colours


def synthetic_images(recipe: ResNetRecipe, seed: int, n: int, offset: int) -> ImageBatch:
    """``n`` images and labels: each class's two colour gratings at a random phase and
    contrast, plus Gaussian pixel noise (``recipe.noise``)."""
    waves, colours = _patterns(recipe, seed)
    g = torch.Generator().manual_seed(seed * _STRIDE + offset)
    labels = torch.randint(0, recipe.classes, (n,), generator=g)
    size = recipe.image_size
    grid = torch.stack(
        torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"), dim=-1
    ).float()  # (H, W, 2)
    phase = 2 * math.pi * torch.rand(n, 2, generator=g)
    contrast = 0.5 + torch.rand(n, 2, generator=g)
    # (n, 2, H, W): the two gratings of each image's class
    gratings = torch.sin(
        torch.einsum("hwd,nkd->nkhw", grid, waves[labels]) + phase[..., None, None]
    )
    gratings = gratings * contrast[..., None, None]
    images = torch.einsum("nkhw,nkc->nchw", gratings, colours[labels])
    return ImageBatch(images + recipe.noise * torch.randn(images.shape, generator=g), labels)


class ResNetRun(RecipeRun):
    """The reference's ``train_one_epoch`` loop on one seed (see the module docstring)."""

    def __init__(
        self, recipe: ResNetRecipe, seed: int, *, wrap: Wrap | None, steps: int, lr: float
    ) -> None:
        self.recipe, self.seed = recipe, seed
        self.steps, self.lr = check_steps(steps), lr
        self.clip, self.keep_clip = 0.0, False  # --clip-grad-norm is off
        self.train_set = synthetic_images(recipe, seed, recipe.train_images, 1)
        self.held_out = synthetic_images(recipe, seed, recipe.held_out_images, 2)
        self.steps_per_epoch = recipe.train_images // recipe.batch_size
        self.epochs = max(1, math.ceil(steps / self.steps_per_epoch))
        torch.manual_seed(seed)
        self.model = SmallResNet(recipe.widths, recipe.classes)
        self.inner = torch.optim.SGD(
            self.model.parameters(),
            lr=lr,
            momentum=recipe.momentum,
            weight_decay=recipe.weight_decay,
            nesterov=recipe.sub_recipe == "nesterov",
        )
        self.optimizer, self.safe = apply_wrap(self.inner, wrap)
        self.scheduler = self._scheduler()
        self.criterion: Any = nn.CrossEntropyLoss()
        if self.safe is not None:
            self.criterion = SafeLoss(self.criterion, optimizer=self.safe)
        self.iteration = 0
        self.model.train()

    def _scheduler(self) -> Any:
        schedulers = torch.optim.lr_scheduler
        if self.recipe.sub_recipe == "sgd":  # steplr, lr_step_size 30 of 90 epochs
            return schedulers.StepLR(self.optimizer, max(1, self.epochs // 3), gamma=0.1)
        warmup = 1  # --lr-warmup-epochs 1 --lr-warmup-method linear (--lr-warmup-decay 0.01)
        return schedulers.SequentialLR(
            self.optimizer,
            [
                schedulers.LinearLR(self.optimizer, start_factor=0.01, total_iters=warmup),
                schedulers.CosineAnnealingLR(self.optimizer, T_max=max(1, self.epochs - warmup)),
            ],
            milestones=[warmup],
        )

    def batch(self, step: int) -> ImageBatch:
        """The ``step``-th batch: a RandomSampler's epoch order, random horizontal flips."""
        epoch, index = divmod(step - 1, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.seed * _STRIDE + 1000 + epoch)
        order = torch.randperm(self.recipe.train_images, generator=g)
        size = self.recipe.batch_size
        chosen = order[index * size : (index + 1) * size]
        images = self.train_set.images[chosen]
        flip = torch.rand(len(chosen), generator=g.manual_seed(self.seed * _STRIDE + step)) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return ImageBatch(images, self.train_set.labels[chosen])

    def corrupt(self, batch: ImageBatch, kind: str) -> ImageBatch:
        return batch._replace(images=corrupt_tensor(batch.images, kind))

    def train_step(self, batch: ImageBatch) -> Tensor:
        """One iteration of ``train_one_epoch``; ``lr_scheduler.step()`` after each epoch."""
        output = self.model(batch.images)
        loss = self.criterion(output, batch.labels)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.iteration += 1
        if self.iteration % self.steps_per_epoch == 0:
            self.scheduler.step()
        return loss.detach()  # type: ignore[no-any-return]

    def held_out_loss(self) -> float:
        logits = self.model(self.held_out.images)
        return float(nn.functional.cross_entropy(logits, self.held_out.labels))


def build_resnet(
    sub_recipe: str = "sgd",
    seed: int = 0,
    *,
    wrap: Wrap | None = None,
    keep_clip: bool = True,
    steps: int | None = None,
    lr: float | None = None,
    recipe: ResNetRecipe | None = None,
    **options: Any,
) -> ResNetRun:
    """torchvision's reference run on ``seed`` for ``sub_recipe`` (``sgd``, ``nesterov``).

    ``keep_clip`` is accepted for a uniform signature and ignored: the reference has no
    clip. ``lr`` defaults to the scaling rule's; ``options`` override
    :class:`ResNetRecipe` fields (``widths=(16, 32, 64)``, ...).
    """
    recipe = replace(recipe or _recipe(sub_recipe), **options)
    return ResNetRun(
        recipe,
        seed,
        wrap=wrap,
        steps=recipe.steps if steps is None else steps,
        lr=recipe.lr if lr is None else lr,
    )

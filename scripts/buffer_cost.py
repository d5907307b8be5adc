"""What putting back the model's buffers costs, on a ResNet-style BatchNorm CNN.

``SafeOptimizer`` keeps the model's buffers before each step's forward pass (BatchNorm's
running statistics: copied each time, they are small) and checks those a forward pass
wrote. This times, interleaved in one process on one thread (medians of ``--rounds``
rounds of ``--steps`` steps each, after a warm-up), the ``opt.step()`` call and the whole
iteration (forward, backward, step) of:

- ``safe``: ``SafeOptimizer(SGD-Nesterov)`` with its defaults (buffers watched);
- ``safe-no-buffers``: the same with buffer handling taken out (nothing watched);
- ``sgd+clip``: the bare SGD with ``clip_grad_norm_(1.0)``, what a careful user writes.

Writes the table to ``results/buffer-cost.md``. Usage:

    python scripts/buffer_cost.py [--out results] [--rounds 15] [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from stableopt import SafeOptimizer
from stableopt.buffers import ModelBuffers


class Block(nn.Module):
    """torchvision's BasicBlock: two 3x3 convs with BatchNorm, a projected shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(width: int = 16) -> nn.Module:
    """A ResNet-20-style CIFAR network (3 stages of 3 blocks)."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)]
    cin = width
    for stage, cout in enumerate((width, 2 * width, 4 * width)):
        for block in range(3):
            layers.append(Block(cin, cout, 2 if stage and not block else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    return nn.Sequential(*layers)


def _setup(name: str, seed: int) -> tuple[nn.Module, Callable[[], None]]:
    torch.manual_seed(seed)
    model = resnet()
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    if name == "sgd+clip":

        def step() -> None:
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            inner.step()

        return model, step
    opt = SafeOptimizer(inner)
    if name == "safe-no-buffers":
        opt.model_buffers = ModelBuffers()  # nothing watched, no discovery
        opt.response.buffers = None
    return model, opt.step


def measure(rounds: int, steps: int, batch: int) -> dict[str, dict[str, float]]:
    names = ("sgd+clip", "safe-no-buffers", "safe")
    setups = {name: _setup(name, 0) for name in names}
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g))
        for _ in range(steps)
    ]
    times: dict[str, dict[str, list[float]]] = {n: {"step": [], "iteration": []} for n in names}
    for warm in range(rounds + 2):
        for name in names if warm % 2 else reversed(names):
            model, step = setups[name]
            step_time = 0.0
            start = time.perf_counter()
            for x, y in data:
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                t0 = time.perf_counter()
                step()
                step_time += time.perf_counter() - t0
            total = time.perf_counter() - start
            if warm >= 2:
                times[name]["step"].append(step_time / steps)
                times[name]["iteration"].append(total / steps)
    return {
        name: {what: statistics.median(values) for what, values in parts.items()}
        for name, parts in times.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    medians = measure(args.rounds, args.steps, args.batch)
    n_params = sum(p.numel() for p in resnet().parameters())
    n_buffers = sum(b.numel() for b in resnet().buffers())
    base = medians["sgd+clip"]
    lines = [
        "# What putting back the model's buffers costs",
        "",
        f"- command: `python scripts/buffer_cost.py {' '.join(argv or sys.argv[1:])}`".rstrip(),
        f"- machine: {platform.platform()}, {os.cpu_count()} CPU cores, 1 torch thread",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- model: ResNet-20-style CIFAR CNN, {n_params / 1e6:.2f}M parameters, 19 BatchNorm "
        f"layers ({n_buffers} buffer values), batch {args.batch} of 3x32x32, SGD-Nesterov",
        f"- medians of {args.rounds} interleaved rounds of {args.steps} steps",
        "",
        "| method | step (ms) | step / sgd+clip | iteration (ms) | iteration / sgd+clip |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, values in medians.items():
        lines.append(
            f"| {name} | {1e3 * values['step']:.3f} | {values['step'] / base['step']:.3f} | "
            f"{1e3 * values['iteration']:.2f} | {values['iteration'] / base['iteration']:.3f} |"
        )
    safe, bare = medians["safe"], medians["safe-no-buffers"]
    lines += [
        "",
        f"Putting back the buffers adds {1e3 * (safe['step'] - bare['step']):.3f} ms to a step "
        f"({100 * (safe['iteration'] - bare['iteration']) / bare['iteration']:.2f}% of the whole "
        "iteration).",
    ]
    text = "\n".join(lines) + "\n"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "buffer-cost.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

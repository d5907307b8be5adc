"""How much ``Rollback(in_state_dict=True)`` adds to a checkpoint.

For a small MLP and a small transformer encoder, each trained a few steps with AdamW
(so the optimizer state and the rollback snapshot exist), measures the bytes of
``torch.save`` into memory of: the model's ``state_dict()``, the bare AdamW's, and
``SafeOptimizer``'s with the default ``Rollback()`` and with ``Rollback(in_state_dict=True)``;
writes the table to results/checkpoint-size.md. Usage:

    python scripts/checkpoint_size.py [--out results]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stableopt import Rollback, SafeOptimizer

STEPS = 4  # a snapshot every 2 good steps: after 4 there is one in the buffers


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


class TinyTransformer(nn.Module):
    """A token embedding, a 4-layer pre-norm encoder and an untied output head."""

    def __init__(self, vocab: int = 8000, width: int = 256, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(
            width, nhead=4, dim_feedforward=4 * width, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))


def _mlp_loss(model: nn.Module) -> torch.Tensor:
    return nn.functional.cross_entropy(model(torch.randn(32, 784)), torch.randint(0, 10, (32,)))


def _lm_loss(model: nn.Module) -> torch.Tensor:
    tokens = torch.randint(0, 8000, (8, 64))
    logits = model(tokens)
    return nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], torch.Tensor]]] = {
    "MLP 784-512-512-10": (mlp, _mlp_loss),
    "transformer encoder (8k vocab, width 256, 4 layers)": (TinyTransformer, _lm_loss),
}


def saved_bytes(obj: Any) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


def measure(
    build: Callable[[], nn.Module], loss_of: Callable[[nn.Module], torch.Tensor]
) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for label, in_state_dict in (("default", False), ("in_state_dict", True)):
        torch.manual_seed(0)
        model = build()
        inner = torch.optim.AdamW(model.parameters(), lr=1e-4)
        opt = SafeOptimizer(inner, rollback=Rollback(every_steps=2, in_state_dict=in_state_dict))
        for _ in range(STEPS):
            opt.zero_grad()
            loss_of(model).backward()
            opt.step()
        assert opt.rollback is not None and opt.rollback.has_snapshot
        sizes["params"] = sum(p.numel() for p in model.parameters())
        sizes["model"] = saved_bytes(model.state_dict())
        sizes["adamw"] = saved_bytes(inner.state_dict())
        sizes[label] = saved_bytes(opt.state_dict())
    return sizes


def _span(ratios: list[float]) -> str:
    low, high = f"{min(ratios):.2f}x", f"{max(ratios):.2f}x"
    return low if low == high else f"{low}-{high}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results")
    args = parser.parse_args()
    torch.set_num_threads(1)

    def mb(n: int) -> str:
        return f"{n / 1e6:.2f}"

    lines = [
        "# Checkpoint size with and without the rollback snapshot",
        "",
        "Command: `python scripts/checkpoint_size.py`; each model trained "
        f"{STEPS} steps with `SafeOptimizer(AdamW, rollback=Rollback(every_steps=2, "
        "in_state_dict=...))`, every state dict saved with `torch.save` into memory (MB = 1e6 "
        "bytes).",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python "
        f"{platform.python_version()}, "
        f"torch {torch.__version__}.",
        "",
        "| model | parameters | model | bare AdamW | SafeOptimizer | SafeOptimizer, "
        "`in_state_dict=True` | optimizer ratio | checkpoint ratio (model + optimizer) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    optimizer_ratios, checkpoint_ratios = [], []
    for name, (build, loss_of) in MODELS.items():
        s = measure(build, loss_of)
        optimizer_ratio = s["in_state_dict"] / s["default"]
        checkpoint_ratio = (s["model"] + s["in_state_dict"]) / (s["model"] + s["default"])
        optimizer_ratios.append(optimizer_ratio)
        checkpoint_ratios.append(checkpoint_ratio)
        lines.append(
            f"| {name} | {s['params']:,} | {mb(s['model'])} | {mb(s['adamw'])} | "
            f"{mb(s['default'])} | {mb(s['in_state_dict'])} | {optimizer_ratio:.2f}x | "
            f"{checkpoint_ratio:.2f}x |"
        )
    lines += [
        "",
        "The default SafeOptimizer state dict is the bare AdamW one plus the stages' small "
        "state (counters, histories, recent events). `in_state_dict=True` adds the snapshot: one "
        "more copy of the weights and of AdamW's two moment buffers, so the optimizer's part "
        f"grows {_span(optimizer_ratios)} and a whole checkpoint (model + optimizer) "
        f"{_span(checkpoint_ratios)}.",
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoint-size.md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

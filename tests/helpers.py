"""Shared test fixtures: every inner optimizer variant, tiny models, deterministic data."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer


class SignSGD(Optimizer):
    """A third-party optimizer (not from torch.optim): sign descent with momentum."""

    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0.9) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                p.add_(buf.sign(), alpha=-group["lr"])
        return loss


@dataclass(frozen=True)
class OptimizerInfo:
    """One inner-optimizer variant: how to build it, and whether it is fused."""

    name: str
    build: Callable[[Any], Optimizer]
    fused: bool = False

    def __repr__(self) -> str:
        return self.name


def _variants() -> list[OptimizerInfo]:
    infos: list[OptimizerInfo] = []
    specs: list[tuple[str, type[Optimizer], dict[str, Any], bool]] = [
        ("SGD", torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}, True),
        ("Adam", torch.optim.Adam, {"lr": 1e-2}, True),
        ("AdamW", torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.05}, True),
        ("RMSprop", torch.optim.RMSprop, {"lr": 1e-3, "momentum": 0.5}, False),
        ("Adagrad", torch.optim.Adagrad, {"lr": 0.05}, True),
    ]
    for name, cls, kwargs, has_fused in specs:

        def make(
            impl: dict[str, Any], cls: type[Optimizer] = cls, kwargs: dict[str, Any] = kwargs
        ) -> Callable[[Any], Optimizer]:
            return lambda params: cls(params, **kwargs, **impl)

        infos.append(OptimizerInfo(f"{name}-forloop", make({"foreach": False})))
        infos.append(OptimizerInfo(f"{name}-foreach", make({"foreach": True})))
        if has_fused:
            infos.append(OptimizerInfo(f"{name}-fused", make({"fused": True}), fused=True))
    infos.append(OptimizerInfo("SignSGD-thirdparty", lambda params: SignSGD(params, lr=1e-3)))
    return infos


OPTIMIZERS = _variants()
NON_FUSED = [info for info in OPTIMIZERS if not info.fused]
FUSED = [info for info in OPTIMIZERS if info.fused]


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)
    )


def batch(step: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of a step, a function of (seed, step) only: resumable anywhere."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    x = torch.randn(32, 8, generator=g)
    y = x[:, :1].sin() + 0.1 * torch.randn(32, 1, generator=g)
    return x, y


def backward(model: nn.Module, step: int, seed: int = 0) -> torch.Tensor:
    x, y = batch(step, seed)
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    return loss.detach()


def twin(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def snapshot(model: nn.Module, opt: Optimizer) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Deep copies of the weights and of the optimizer state, in parameter order."""
    params = [p.detach().clone() for p in model.parameters()]
    state = [
        {
            k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
            for k, v in opt.state.get(p, {}).items()
        }
        for p in model.parameters()
    ]
    return params, state


def same_snapshot(
    a: tuple[list[torch.Tensor], list[dict[str, Any]]],
    b: tuple[list[torch.Tensor], list[dict[str, Any]]],
) -> bool:
    params_a, state_a = a
    params_b, state_b = b
    if not all(torch.equal(x, y) for x, y in zip(params_a, params_b)):
        return False
    for sa, sb in zip(state_a, state_b):
        if sa.keys() != sb.keys():
            return False
        for key in sa:
            va, vb = sa[key], sb[key]
            if isinstance(va, torch.Tensor):
                if not (
                    isinstance(vb, torch.Tensor) and va.dtype == vb.dtype and torch.equal(va, vb)
                ):
                    return False
            elif va != vb:
                return False
    return True


def scale_grads(model: nn.Module, factor: float) -> None:
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(factor)


def set_first_grad(model: nn.Module, value: float) -> None:
    grad = next(model.parameters()).grad
    assert grad is not None
    grad.view(-1)[0] = value

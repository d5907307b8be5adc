"""Worker functions for tests/test_distributed.py: each runs in one spawned rank.

Every worker takes ``(rank, world_size, out_dir)`` and returns a picklable result
that :func:`launch` collects from ``out_dir`` (one file per rank) for the parent
to assert on. Nothing is asserted here except where a rank cannot go on.
"""

from __future__ import annotations

import copy
import os
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from stableopt import SafeOptimizer
from stableopt.stats import all_finite, grad_stats

COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter")


# -- launching --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world_size: int, port: int, name: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        result: Any = WORKERS[name](rank, world_size, Path(out_dir))
        torch.save({"ok": True, "result": result}, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, Path(out_dir) / f"rank{rank}.pt")
        raise
    finally:
        dist.destroy_process_group()


def launch(name: str, out_dir: Path, world_size: int = 2, timeout: float = 90.0) -> list[Any]:
    """Run worker ``name`` on ``world_size`` spawned gloo ranks; return each rank's result.

    A hang fails after ``timeout`` seconds (the ranks are killed) instead of hanging CI.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(
        _entry,
        args=(world_size, free_port(), name, str(out_dir)),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {name!r} did not finish in {timeout:.0f} s")
    except Exception as exc:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        errors = []
        for rank in range(world_size):
            path = out_dir / f"rank{rank}.pt"
            if path.exists():
                saved = torch.load(path, weights_only=False)
                if not saved["ok"]:
                    errors.append(f"rank {rank}:\n{saved['error']}")
        raise AssertionError(f"{exc}\n" + "\n".join(errors)) from exc
    results = []
    for rank in range(world_size):
        saved = torch.load(out_dir / f"rank{rank}.pt", weights_only=False)
        assert saved["ok"], saved.get("error")
        results.append(saved["result"])
    return results


# -- shared pieces ----------------------------------------------------------------------


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)
    )


def batch(step: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    x = torch.randn(16, 8, generator=g)
    y = x[:, :1].sin() + 0.1 * torch.randn(16, 1, generator=g)
    return x, y


class CollectiveCounter:
    """Counts the Python-level collectives issued while active (DDP's reducer is C++)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self._saved: dict[str, Callable[..., Any]] = {}

    def __enter__(self) -> CollectiveCounter:
        for name in COLLECTIVES:
            original = getattr(dist, name)
            self._saved[name] = original

            def counted(*args: Any, _n: str = name, _f: Any = original, **kwargs: Any) -> Any:
                self.calls[_n] = self.calls.get(_n, 0) + 1
                return _f(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)


def _loc(tensor: Any) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameter or gradient)."""
    local: torch.Tensor = tensor.to_local()
    return local


def _stats(opt: SafeOptimizer) -> dict[str, Any]:
    stats = opt.stats()
    stats["effective_lr"] = opt.effective_lr()
    stats["events"] = [(e.step, e.kind) for e in opt.events()]
    return stats


# -- DDP -------------------------------------------------------------------------------

DDP_STEPS = 200
NAN_STEP, NAN_RANK = 60, 0
SPIKE_STEP, SPIKE_RANK = 130, 1


def ddp_faults(rank: int, world_size: int, out_dir: Path) -> dict[str, Any]:
    """Each rank its own data; rank 0 gets a NaN batch, rank 1 a loss spike."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    results: dict[str, Any] = {}
    configs: list[tuple[str, dict[str, Any]]] = [("defaults", {}), ("clip1", {"clip": 1.0})]
    for label, kwargs in configs:
        model = DDP(make_model(seed=rank))  # DDP broadcasts rank 0's weights
        opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), **kwargs)
        collectives_per_step = []
        for step in range(DDP_STEPS):
            x, y = batch(step, seed=rank + 1)
            if step == NAN_STEP and rank == NAN_RANK:
                x[3, 2] = float("nan")
            if step == SPIKE_STEP and rank == SPIKE_RANK:
                y = y * 1e4
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.observe_loss(loss)
            with CollectiveCounter() as counter:
                opt.step()
            collectives_per_step.append(dict(counter.calls))
        results[label] = {
            "params": [p.detach().clone() for p in model.parameters()],
            "state": [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()],
            "stats": _stats(opt),
            "collectives": collectives_per_step,
        }
    return results


# -- FSDP2 ------------------------------------------------------------------------------


def _shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.children():
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _global_batch(step: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(batch(step, seed=r + 1) for r in range(world_size)))
    return torch.cat(xs), torch.cat(ys)


def _full(model: nn.Module) -> list[torch.Tensor]:
    return [cast(Any, p).full_tensor().detach().clone() for p in model.parameters()]


def fsdp_norm(rank: int, world_size: int, out_dir: Path) -> dict[str, Any]:
    """Global norm and finite flag of sharded grads vs a non-sharded reference."""
    ref = make_model()
    model = _shard(copy.deepcopy(ref))
    x, y = batch(0, seed=rank + 1)
    nn.functional.mse_loss(model(x), y).backward()
    gx, gy = _global_batch(0, world_size)
    nn.functional.mse_loss(ref(gx), gy).backward()

    grads: list[torch.Tensor] = [p.grad for p in model.parameters() if p.grad is not None]
    with CollectiveCounter() as counter:
        ours = grad_stats(grads)
    torch_norm = cast(Any, torch.nn.utils.get_total_norm(grads)).full_tensor()
    ref_norm = grad_stats([p.grad for p in ref.parameters() if p.grad is not None]).grad_norm
    weights_ok = all_finite(list(model.parameters()))

    # NaN in rank 1's shard of one gradient only.
    if rank == 1:
        _loc(grads[2]).view(-1)[0] = float("nan")
    nan_stats = grad_stats(grads)
    # NaN in rank 1's shard of one weight only: all_finite is an AND over ranks.
    params: list[torch.Tensor] = list(model.parameters())
    if rank == 1:
        with torch.no_grad():
            _loc(params[0]).view(-1)[0] = float("nan")
    weights_after = all_finite(params)
    return {
        "norm": ours.grad_norm,
        "is_finite": bool(ours.is_finite),
        "is_plain": type(ours.grad_norm) is torch.Tensor,
        "torch_norm": torch_norm,
        "ref_norm": ref_norm,
        "weights_ok": bool(weights_ok),
        "collectives": dict(counter.calls),
        "nan_is_finite": bool(nan_stats.is_finite),
        "nan_norm": float(nan_stats.grad_norm),
        "weights_after_nan": bool(weights_after),
    }


def _fsdp_train(
    rank: int,
    world_size: int,
    steps: int,
    check_weights: str,
    fault: Callable[[int, int, nn.Module, SafeOptimizer], None] | None = None,
    clip: Any = "zscore",
) -> tuple[nn.Module, SafeOptimizer, list[dict[str, int]]]:
    model = _shard(make_model())
    opt = SafeOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        check_weights=check_weights,  # type: ignore[arg-type]
        clip=clip,
    )
    collectives = []
    for step in range(steps):
        x, y = batch(step, seed=rank + 1)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.observe_loss(loss)
        if fault is not None:
            fault(step, rank, model, opt)
        with CollectiveCounter() as counter:
            opt.step()
        collectives.append(dict(counter.calls))
    return model, opt, collectives


GRAD_NAN_STEP = 12
WEIGHT_NAN_STEP = 30  # after the snapshot of good step 25 (every_steps=25 below is not used)


def _nan_grad(step: int, rank: int, model: nn.Module, opt: SafeOptimizer) -> None:
    if step == GRAD_NAN_STEP and rank == 1:
        _loc(list(model.parameters())[2].grad).view(-1)[0] = float("nan")


def _nan_weight(step: int, rank: int, model: nn.Module, opt: SafeOptimizer) -> None:
    # After this step's backward: the update of this step runs from a NaN weight shard.
    if step == WEIGHT_NAN_STEP and rank == 1:
        with torch.no_grad():
            _loc(list(model.parameters())[0]).view(-1)[0] = float("nan")


def fsdp_faults(rank: int, world_size: int, out_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cases: list[tuple[str, str, Any]] = [
        ("grad_nan", "lazy", _nan_grad),
        ("weight_nan_lazy", "lazy", _nan_weight),
        ("weight_nan_every_step", "every_step", _nan_weight),
        ("healthy_every_step", "every_step", None),
    ]
    for label, check, fault in cases:
        model, opt, collectives = _fsdp_train(rank, world_size, 45, check, fault)
        out[label] = {
            "params": _full(model),
            "local": [_loc(p).clone() for p in model.parameters()],
            "stats": _stats(opt),
            "collectives": collectives,
            "finite": all(bool(torch.isfinite(p).all()) for p in _full(model)),
        }
    return out


def fsdp_checkpoint(rank: int, world_size: int, out_dir: Path) -> dict[str, Any]:
    """The documented FSDP2 recipe: DCP for model + inner optimizer, ours beside it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    def build() -> tuple[nn.Module, SafeOptimizer]:
        model = _shard(make_model())
        return model, SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))

    def train(model: nn.Module, opt: SafeOptimizer, steps: range) -> None:
        for step in steps:
            x, y = batch(step, seed=rank + 1)
            if step == 7 and rank == 0:
                x[0, 0] = float("nan")  # a skip and an LR cut before the checkpoint
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.observe_loss(loss)
            opt.step()

    model, opt = build()
    train(model, opt, range(15))
    ckpt = out_dir / "ckpt"
    # save
    dcp.save(
        {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, opt.optimizer),
        },
        checkpoint_id=str(ckpt),
    )
    torch.save(opt.state_dict()["stableopt"], ckpt / f"stableopt_rank{rank}.pt")
    dist.barrier()
    train(model, opt, range(15, 30))
    expected, expected_stats = _full(model), _stats(opt)

    # load into fresh objects
    model2, opt2 = build()
    state: dict[str, Any] = {
        "model": get_model_state_dict(model2),
        "optim": get_optimizer_state_dict(model2, opt2.optimizer),
    }
    dcp.load(state, checkpoint_id=str(ckpt))
    set_model_state_dict(model2, state["model"])
    set_optimizer_state_dict(model2, opt2.optimizer, state["optim"])
    inner = opt2.optimizer.state_dict()
    inner["stableopt"] = torch.load(ckpt / f"stableopt_rank{rank}.pt", weights_only=False)
    opt2.load_state_dict(inner)
    resumed_stats_at_load = _stats(opt2)
    train(model2, opt2, range(15, 30))
    return {
        "expected": expected,
        "resumed": _full(model2),
        "expected_stats": expected_stats,
        "resumed_stats": _stats(opt2),
        "stats_at_load": resumed_stats_at_load,
    }


WORKERS: dict[str, Callable[[int, int, Path], Any]] = {
    "ddp_faults": ddp_faults,
    "fsdp_norm": fsdp_norm,
    "fsdp_faults": fsdp_faults,
    "fsdp_checkpoint": fsdp_checkpoint,
}

"""Worker functions for tests/test_distributed.py: each runs in one spawned rank.

Every worker takes ``(rank, world_size, out_dir)`` and returns a picklable result
that :func:`launch` collects from ``out_dir`` (one file per rank) for the parent
to assert on. Nothing is asserted here except where a rank cannot go on.

Two workers, one per parallelism, each running every scenario of its kind in one
process group, so the test file pays the spawn and ``init_process_group`` cost twice.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from stableopt import PlateauLR, Rollback, SafeOptimizer
from stableopt.grad_norms import all_finite, grad_stats
from stableopt.response import Response
from stableopt.verdict import SkipReason, StepVerdict

# -- launching --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world_size: int, port: int, name: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # what DeepSpeed reads besides the process group this sets up (CPU accelerator)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_SIZE=str(world_size),
        DS_ACCELERATOR="cpu",
    )
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
        torch.save(
            {"ok": False, "error": traceback.format_exc()},
            Path(out_dir) / f"rank{rank}.pt",
        )
        raise
    finally:
        dist.destroy_process_group()


def launch(name: str, out_dir: Path, world_size: int = 2, timeout: float = 120.0) -> list[Any]:
    """Run worker ``name`` on ``world_size`` spawned gloo ranks; return each rank's result.

    A hang fails after ``timeout`` seconds (the ranks are killed) instead of hanging CI;
    a rank that raised has its traceback in the assertion message.
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


def batch(step: int, seed: int, noise_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """16 samples of rank-specific data (``seed``); ``noise_only``: targets unrelated to x."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    x = torch.randn(16, 8, generator=g)
    noise = torch.randn(16, 1, generator=g)
    y = noise if noise_only else x[:, :1].sin() + 0.1 * noise
    return x, y


@contextmanager
def count_collectives(active: bool = True) -> Iterator[dict[str, int]]:
    """Every collective issued inside, by op: c10d calls and DTensor's functional ones.

    ``CommDebugMode`` intercepts every op (about 5x the cost of a tiny step), so the
    runs count only the steps they assert on (``active``); others yield ``{}``.
    """
    from torch.distributed.tensor.debug import CommDebugMode

    counts: dict[str, int] = {}
    if not active:
        yield counts
        return
    with CommDebugMode() as mode:
        yield counts
    counts.update({str(op): n for op, n in mode.get_comm_counts().items()})


@contextmanager
def record_host_flags() -> Iterator[list[dict[str, Any]]]:
    """Every step's verdict as the host decides on it (flags and numbers), in order.

    Recorded where every step's response starts, whichever way it was decided (in
    floats for plain CPU gradients, on the device for sharded ones).
    """
    reads: list[dict[str, Any]] = []
    respond = Response.respond

    def recording(self: Response, verdict: StepVerdict, **kwargs: Any) -> None:
        record = dataclasses.asdict(verdict)
        # NaN as a string: the runs' records are compared with ==
        record = {k: "nan" if isinstance(v, float) and v != v else v for k, v in record.items()}
        record["loss_spike"] = verdict.skip_reason is SkipReason.LOSS_SPIKE
        reads.append(record)
        respond(self, verdict, **kwargs)

    Response.respond = recording  # type: ignore[method-assign]
    try:
        yield reads
    finally:
        Response.respond = respond  # type: ignore[method-assign]


def _stats(opt: SafeOptimizer) -> dict[str, Any]:
    stats = opt.stats()
    stats["effective_lr"] = opt.effective_lr()
    stats["events"] = [(e.step, e.kind) for e in opt.events()]
    return stats


def _loc(tensor: Any) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameter or gradient)."""
    local: torch.Tensor = tensor.to_local()
    return local


# -- DDP -------------------------------------------------------------------------------

DDP_STEPS = 200
NAN_STEP, NAN_RANK = 60, 0
SPIKE_STEP, SPIKE_RANK = 130, 1
PLATEAU_STEPS = 100


def ddp_counted(step: int) -> bool:
    """The DDP steps whose collectives are counted: every 10th and the faulty ones."""
    return step % 10 == 0 or step in (
        NAN_STEP,
        NAN_STEP + 1,
        SPIKE_STEP,
        SPIKE_STEP + 1,
    )


def _ddp_run(
    rank: int, steps: int, make_opt: Callable[[Any], SafeOptimizer], plateau_data: bool
) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_model(seed=rank))  # different init per rank: DDP broadcasts rank 0's
    opt = make_opt(model.parameters())
    local_losses, collectives = [], []
    with record_host_flags() as flags:
        for step in range(steps):
            # Own data per rank. In the plateau run rank 0 fits noise (flat loss) and
            # rank 1 a signal (falling loss): their own losses disagree on a plateau.
            x, y = batch(step, seed=rank + 1, noise_only=plateau_data and rank == 0)
            if step == NAN_STEP and rank == NAN_RANK and not plateau_data:
                x[3, 2] = float("nan")
            if step == SPIKE_STEP and rank == SPIKE_RANK and not plateau_data:
                y = y * 1e4
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.observe_loss(loss)  # this rank's own loss
            local_losses.append(loss.detach().clone())
            with count_collectives(ddp_counted(step)) as counts:
                opt.step()
            collectives.append(counts)
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "state": [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()],
        "stats": _stats(opt),
        "flags": flags,
        "local_losses": local_losses,
        "collectives": collectives,
    }


def make_bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1))


BN_STEPS, BN_NAN_STEP = 40, 30


def bn_run(rank: int, wrap: Callable[[nn.Module], nn.Module], skip_bad: bool) -> dict[str, Any]:
    """A BatchNorm model, rank 0's batch NaN at ``BN_NAN_STEP`` (or, ``skip_bad``, that step
    left out on every rank): what the buffers and weights are at the end."""
    inner = make_bn_model(seed=0)
    model = wrap(inner)
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    for step in range(BN_STEPS):
        x, y = batch(step, seed=rank + 1)
        if step == BN_NAN_STEP:
            if skip_bad:
                continue
            if rank == 0:
                x[3, 2] = float("nan")
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        inner.eval()
        out = inner(batch(999, seed=7)[0])
    return {
        "buffers": [b.detach().clone() for b in inner.buffers()],
        "params": [_full_tensor(p) for p in inner.parameters()],
        "skipped": opt.stats()["skipped_steps"],
        "eval_finite": bool(torch.isfinite(out).all()),
    }


def _full_tensor(tensor: Any) -> torch.Tensor:
    full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    return cast(torch.Tensor, full).detach().clone()


def ddp(rank: int, world_size: int, out_dir: Path) -> dict[str, Any]:
    """Each rank its own data; rank 0 gets a NaN batch, rank 1 a loss spike; a plateau run."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    def adamw(params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=1e-2)

    def with_plateau(params: Any) -> SafeOptimizer:
        plateau = PlateauLR(patience_steps=20, check_every_steps=10, cooldown_steps=10)
        return SafeOptimizer(adamw(params), plateau=plateau)

    return {
        "bn": bn_run(rank, DDP, skip_bad=False),
        "bn_never": bn_run(rank, DDP, skip_bad=True),
        "defaults": _ddp_run(rank, DDP_STEPS, lambda p: SafeOptimizer(adamw(p)), False),
        "clip1": _ddp_run(rank, DDP_STEPS, lambda p: SafeOptimizer(adamw(p), clip=1.0), False),
        "plateau": _ddp_run(rank, PLATEAU_STEPS, with_plateau, True),
    }


# -- FSDP2 ------------------------------------------------------------------------------


def _shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.children():
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _global_batch(step: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenation of every rank's batch: what the unsharded reference trains on."""
    xs, ys = zip(*(batch(step, seed=r + 1) for r in range(world_size)))
    return torch.cat(xs), torch.cat(ys)


def _full(model: nn.Module) -> list[torch.Tensor]:
    return [cast(Any, p).full_tensor().detach().clone() for p in model.parameters()]


def _fsdp_norm(rank: int, world_size: int) -> dict[str, Any]:
    """Global norm, loss mean and finite flags of sharded tensors vs a non-sharded model."""
    ref = make_model()
    model = _shard(copy.deepcopy(ref))
    x, y = batch(0, seed=rank + 1)
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    gx, gy = _global_batch(0, world_size)
    nn.functional.mse_loss(ref(gx), gy).backward()

    grads: list[torch.Tensor] = [p.grad for p in model.parameters() if p.grad is not None]
    with count_collectives() as stats_comms:
        ours = grad_stats(grads, loss=loss.detach())
    torch_norm = cast(Any, torch.nn.utils.get_total_norm(grads)).full_tensor()
    ref_norm = torch.nn.utils.get_total_norm(
        [p.grad for p in ref.parameters() if p.grad is not None]
    )
    with count_collectives() as weight_comms:
        weights_ok = all_finite(list(model.parameters()))

    if rank == 1:  # NaN in rank 1's shard of one gradient only
        _loc(grads[2]).view(-1)[0] = float("nan")
    nan_stats = grad_stats(grads)
    params: list[torch.Tensor] = list(model.parameters())
    if rank == 1:  # NaN in rank 1's shard of one weight only
        with torch.no_grad():
            _loc(params[0]).view(-1)[0] = float("nan")
    weights_after = all_finite(params)
    return {
        "norm": ours.grad_norm,
        "is_finite": bool(torch.isfinite(ours.grad_norm)),
        "is_plain": type(ours.grad_norm) is torch.Tensor,
        "loss_mean": ours.loss,
        "local_loss": loss.detach(),
        "torch_norm": torch_norm,
        "ref_norm": ref_norm,
        "weights_ok": bool(weights_ok),
        "stats_comms": stats_comms,
        "weight_comms": weight_comms,
        "nan_is_finite": bool(torch.isfinite(nan_stats.grad_norm)),
        "weights_after_nan": bool(weights_after),
    }


TRANSPARENCY_STEPS = 10
TRANSPARENCY_MAX_NORM = 0.25  # below the norms of this run: every step is clipped


def _fsdp_transparency(rank: int, world_size: int) -> dict[str, Any]:
    """SafeOptimizer on FSDP2 vs an independent non-sharded run on the global batch."""
    out: dict[str, Any] = {}
    cases: list[tuple[str, dict[str, Any]]] = [
        ("clip", {}),
        ("clip_fused", {"fused": True}),
        ("agc", {}),
    ]
    for label, inner_kwargs in cases:
        ref = make_model()
        model = _shard(copy.deepcopy(ref))
        clip: Any = "agc" if label == "agc" else TRANSPARENCY_MAX_NORM
        adamw = torch.optim.AdamW(model.parameters(), lr=1e-2, **inner_kwargs)
        opt = SafeOptimizer(adamw, clip=clip)
        ref_adamw = torch.optim.AdamW(ref.parameters(), lr=1e-2)
        # The reference for AGC is stableopt's AGC unsharded (its own tests check the
        # formula); for a fixed clip it is torch's AdamW + clip_grad_norm_.
        ref_opt: Any = SafeOptimizer(ref_adamw, clip="agc") if label == "agc" else ref_adamw
        for step in range(TRANSPARENCY_STEPS):
            x, y = batch(step, seed=rank + 1)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.observe_loss(loss)
            opt.step()
            gx, gy = _global_batch(step, world_size)
            ref_opt.zero_grad()
            nn.functional.mse_loss(ref(gx), gy).backward()
            if label != "agc":
                torch.nn.utils.clip_grad_norm_(ref.parameters(), TRANSPARENCY_MAX_NORM)
            ref_opt.step()
        out[label] = {
            "params": _full(model),
            "ref_params": [p.detach().clone() for p in ref.parameters()],
            "stats": _stats(opt),
        }
    return out


FAULT_STEPS = 20
SNAPSHOT_EVERY = 5  # Rollback(every_steps=5): snapshots after good steps 5, 10, 15, 20
GRAD_NAN_STEP = 8
WEIGHT_NAN_STEP = 17  # after the snapshot of good step 15


def _nan_grad(step: int, rank: int, model: nn.Module) -> None:
    if step == GRAD_NAN_STEP and rank == 1:
        _loc(list(model.parameters())[2].grad).view(-1)[0] = float("nan")


def _nan_weight(step: int, rank: int, model: nn.Module) -> None:
    # After this step's backward: this step's update runs from a NaN weight shard.
    if step == WEIGHT_NAN_STEP and rank == 1:
        with torch.no_grad():
            _loc(list(model.parameters())[0]).view(-1)[0] = float("nan")


FAULT_CASES: list[tuple[str, dict[str, Any], Any]] = [
    ("grad_nan", {"check_weights": "lazy"}, _nan_grad),
    ("grad_nan_clip1_fused", {"clip": 1.0, "fused": True}, _nan_grad),
    ("weight_nan_lazy", {"check_weights": "lazy"}, _nan_weight),
    (
        "weight_nan_every_step",
        {"clip": 1.0, "check_weights": "every_step"},
        _nan_weight,
    ),
    ("healthy", {"check_weights": "lazy"}, None),
    ("healthy_every_step", {"check_weights": "every_step"}, None),
]


def _fsdp_faults(rank: int, world_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, case_kwargs, fault in FAULT_CASES:
        kwargs = dict(case_kwargs)
        fused = kwargs.pop("fused", False)
        model = _shard(make_model())
        opt = SafeOptimizer(
            torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused),
            rollback=Rollback(every_steps=SNAPSHOT_EVERY),
            **kwargs,
        )
        collectives = []
        with record_host_flags() as flags:
            for step in range(FAULT_STEPS):
                x, y = batch(step, seed=rank + 1)
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                opt.observe_loss(loss)
                if fault is not None:
                    fault(step, rank, model)
                counted = fault is None or step in (GRAD_NAN_STEP, WEIGHT_NAN_STEP)
                with count_collectives(counted) as counts:
                    opt.step()
                collectives.append(counts)
        out[label] = {
            "params": _full(model),
            "stats": _stats(opt),
            "flags": flags,
            "collectives": collectives,
        }
    return out


CHECKPOINT_STEP = 10


def _fsdp_checkpoint(rank: int, world_size: int, out_dir: Path) -> dict[str, Any]:
    """The documented FSDP2 recipe (DCP for model + inner optimizer, ours beside it)
    and what happens when the SafeOptimizer itself is handed to DCP's helpers."""
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
            if step == 5 and rank == 0:
                x[0, 0] = float("nan")  # a skip and an LR cut before the checkpoint
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.observe_loss(loss)
            opt.step()

    model, opt = build()
    train(model, opt, range(CHECKPOINT_STEP))
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
    train(model, opt, range(CHECKPOINT_STEP, 2 * CHECKPOINT_STEP))
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
    stats_at_load = _stats(opt2)
    train(model2, opt2, range(CHECKPOINT_STEP, 2 * CHECKPOINT_STEP))

    # The pitfalls the docs name: DCP's helpers given the SafeOptimizer itself.
    model3, opt3 = build()
    keys = sorted(get_optimizer_state_dict(model3, opt3))  # fresh: DCP runs opt3.step()
    stats_after_get = _stats(opt3)
    train(model3, opt3, range(3))
    set_optimizer_state_dict(model3, opt3, get_optimizer_state_dict(model3, opt3))
    stats_after_set = _stats(opt3)
    return {
        "expected": expected,
        "resumed": _full(model2),
        "expected_stats": expected_stats,
        "resumed_stats": _stats(opt2),
        "stats_at_load": stats_at_load,
        "pitfall_keys": keys,
        "pitfall_stats_after_get": stats_after_get,
        "pitfall_stats_after_set": stats_after_set,
    }


def fsdp(rank: int, world_size: int, out_dir: Path) -> dict[str, Any]:
    return {
        "bn": bn_run(rank, _shard, skip_bad=False),
        "bn_never": bn_run(rank, _shard, skip_bad=True),
        "norm": _fsdp_norm(rank, world_size),
        "transparency": _fsdp_transparency(rank, world_size),
        "faults": _fsdp_faults(rank, world_size),
        "checkpoint": _fsdp_checkpoint(rank, world_size, out_dir),
    }


# -- DeepSpeed ZeRO ------------------------------------------------------------------------

#: ZeRO runs: the step of the x1e4 batch on rank 1, of the NaN target on rank 0, and of the
#: update that writes a NaN into rank 1's partition (a separate run).
ZERO_STEPS, ZERO_SPIKE, ZERO_NAN, ZERO_CORRUPT = 40, 12, 22, 18


def _zero_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch(step, seed=rank)
    if step == ZERO_SPIKE and rank == 1:
        y = y * 1e4  # a x1e4 batch (its targets): a loss spike of the mean loss
    if step == ZERO_NAN and rank == 0:
        y = y.clone()
        y[0, 0] = math.nan
    return x, y


def _zero_run(rank: int, stage: int, corrupt: bool) -> dict[str, Any]:
    """One ZeRO run of ``ZERO_STEPS`` steps with SafeOptimizer as the client optimizer."""
    import deepspeed

    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = SafeOptimizer(inner)
    now = {"step": 0}

    def corrupt_update(optimizer: Any, *_: Any) -> None:  # a bad update on rank 1's shard
        if corrupt and rank == 1 and now["step"] == ZERO_CORRUPT:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].view(-1)[0] = math.nan

    inner.register_step_post_hook(corrupt_update)
    config = {
        "train_micro_batch_size_per_gpu": 16,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    decisions = []
    for step in range(1, ZERO_STEPS + 1):
        now["step"] = step
        x, y = _zero_batch(step, rank) if not corrupt else batch(step, seed=rank)
        loss = nn.functional.mse_loss(engine(x), y)
        opt.observe_loss(loss)
        engine.backward(loss)
        before = opt.stats()["steps"]
        engine.step()
        verdict = opt.last_verdict
        assert verdict is not None and opt.stats()["steps"] == before + 1
        decisions.append(
            (
                step,
                engine.was_step_applied(),
                verdict.is_accepted,
                str(verdict.skip_reason),
                verdict.clip_coefficient,
                verdict.grad_norm,
                verdict.loss,
                verdict.weights_ok,
                verdict.bad_params,
            )
        )
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        weights = [p.detach().clone() for p in model.parameters()]
    stats = opt.stats()
    events = [(e.step, str(e.kind), str(e.cause)) for e in opt.events()]
    return {
        "decisions": decisions,
        "weights": weights,
        "stats": {k: stats[k] for k in ("steps", "good_steps", "skipped_steps", "rollbacks")},
        "events": events,
        "engine_skipped": engine.skipped_steps,
        "engine_steps": engine.global_steps,
    }


def zero_reference() -> dict[str, Any]:
    """One process, the same global batch (both ranks' samples) and faults."""
    model = make_model()
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    decisions = []
    for step in range(1, ZERO_STEPS + 1):
        parts = [_zero_batch(step, rank) for rank in range(2)]
        x = torch.cat([p[0] for p in parts])
        y = torch.cat([p[1] for p in parts])
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        opt.observe_loss(loss)
        loss.backward()
        opt.step()
        verdict = opt.last_verdict
        assert verdict is not None
        decisions.append((step, verdict.is_accepted, str(verdict.skip_reason)))
    return {"decisions": decisions, "weights": [p.detach().clone() for p in model.parameters()]}


def _zero_agc(rank: int) -> str:
    """A unit-wise clip under ZeRO: refused at the first step, naming it."""
    import deepspeed

    model = make_model()
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), clip="agc")
    config = {
        "train_micro_batch_size_per_gpu": 16,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    x, y = batch(1, seed=rank)
    engine.backward(nn.functional.mse_loss(engine(x), y))
    try:
        engine.step()
    except ValueError as error:
        return str(error)
    return ""


def _zero_clipped(rank: int, ours: bool) -> list[torch.Tensor]:
    """Stage 2 at a norm that clips every step: DeepSpeed's ``gradient_clipping`` with
    plain AdamW, or ours (``clip=c``, DeepSpeed's off)."""
    import deepspeed

    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optimizer = SafeOptimizer(inner, clip=ZERO_CLIP) if ours else inner
    config = {
        "train_micro_batch_size_per_gpu": 16,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0 if ours else ZERO_CLIP,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    for step in range(1, 11):
        x, y = batch(step, seed=rank)
        engine.backward(nn.functional.mse_loss(engine(x), y))
        engine.step()
    return [p.detach().clone() for p in model.parameters()]


def _zero_resume(rank: int, stage: int, out_dir: Path) -> dict[str, Any]:
    """Train 12 steps, ``engine.save_checkpoint``, train 8 more; then a fresh engine loads the
    checkpoint and trains the same 8: the two must end alike (a skip and a spike included)."""
    import deepspeed

    def build() -> tuple[Any, SafeOptimizer, nn.Module]:
        model = make_model()
        opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
        config = {
            "train_micro_batch_size_per_gpu": 16,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0,
        }
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        return engine, opt, model

    def train(engine: Any, opt: SafeOptimizer, steps: range) -> None:
        for step in steps:
            x, y = _zero_batch(step, rank)
            loss = nn.functional.mse_loss(engine(x), y)
            opt.observe_loss(loss)
            engine.backward(loss)
            engine.step()

    def weights(model: nn.Module) -> list[torch.Tensor]:
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return [p.detach().clone() for p in model.parameters()]

    checkpoint = out_dir / f"zero{stage}"
    engine, opt, model = build()
    train(engine, opt, range(1, ZERO_SPIKE + 1))  # the spike is the last step saved
    engine.save_checkpoint(str(checkpoint), tag="t")
    train(engine, opt, range(ZERO_SPIKE + 1, ZERO_NAN + 3))
    straight = (weights(model), opt.stats()["steps"], opt.stats()["skipped_steps"])
    engine, opt, model = build()
    engine.load_checkpoint(str(checkpoint), tag="t")
    resumed_at = opt.stats()["steps"]
    train(engine, opt, range(ZERO_SPIKE + 1, ZERO_NAN + 3))
    resumed = (weights(model), opt.stats()["steps"], opt.stats()["skipped_steps"])
    return {"straight": straight, "resumed": resumed, "resumed_at": resumed_at}


#: A clip norm below every step's gradient norm in :func:`_zero_clipped`.
ZERO_CLIP = 0.05


def zero(rank: int, world_size: int, out_dir: Path) -> dict[str, Any]:
    runs: dict[str, Any] = {
        f"stage{stage}-{kind}": _zero_run(rank, stage, kind == "corrupt")
        for stage in (1, 2, 3)
        for kind in ("faults", "corrupt")
    }
    runs["agc"] = _zero_agc(rank)
    runs["clip-deepspeed"] = _zero_clipped(rank, ours=False)
    runs["clip-ours"] = _zero_clipped(rank, ours=True)
    for stage in (1, 2, 3):
        runs[f"resume{stage}"] = _zero_resume(rank, stage, out_dir)
    return runs


WORKERS: dict[str, Callable[[int, int, Path], Any]] = {"ddp": ddp, "fsdp": fsdp, "zero": zero}

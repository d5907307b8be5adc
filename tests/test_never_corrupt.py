"""Never corrupt: after ``step()`` returns no weight and no optimizer state holds NaN/Inf, a
snapshot is verified before it is kept, a load is validated before it is committed, and what
``step()`` reports survives a checkpoint.

Each case is one that broke before: an update that writes NaN (Adam with eps=0 on a zero
gradient) undone only at the next step; an Inf weight behind a saturating tanh that keeps
loss and gradients finite; every update writing NaN; NaN weights before the first step;
a checkpoint with a NaN ``exp_avg``; a half-loaded refused state dict; a layer that grew
from 8 to 16 units; global optimizer hooks firing twice.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from stableopt import DivergenceError, Rollback, SafeOptimizer, ZScoreClip
from stableopt.outcomes import Cause
from tests.helpers import backward, make_model, same_snapshot, snapshot

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="stableopt")


def finite(model: nn.Module, opt: Any) -> bool:
    tensors = [p.detach() for p in model.parameters()]
    for p in model.parameters():
        tensors += [v for v in opt.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def corrupt_on(opt: SafeOptimizer, steps: set[int], write: Any) -> None:
    """The inner update of each of ``steps`` (counted from 1) is followed by ``write()``."""

    def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
        if opt.monitor.counters["steps"] in steps:
            with torch.no_grad():
                write()

    opt.optimizer.register_step_post_hook(hook)


def test_an_update_that_writes_nan_is_undone_within_the_same_step() -> None:
    """Adam with eps=0 on a zero gradient divides 0 by 0."""
    weight = nn.Parameter(torch.randn(3))
    zero = nn.Parameter(torch.randn(2))
    opt = SafeOptimizer(torch.optim.Adam([weight, zero], lr=0.1, eps=0.0))
    for _ in range(3):
        weight.grad, zero.grad = torch.randn(3), torch.zeros(2)
        opt.step()
        assert torch.isfinite(weight).all() and torch.isfinite(zero).all()
        assert all(torch.isfinite(v).all() for v in opt.state[weight].values())
    assert opt.stats()["rollbacks"] == 3
    # only what was corrupted went back: the weight with a real gradient kept training
    assert [e.kind for e in opt.events()].count("rollback") == 3


def test_an_inf_weight_behind_a_saturating_tanh_is_found_although_the_loss_stays_finite() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = SafeOptimizer(torch.optim.SGD(model.parameters(), lr=0.01))
    corrupt_on(opt, {5}, lambda: model[0].weight.view(-1)[0].fill_(math.inf))
    for step in range(1, 36):
        opt.zero_grad()
        x = torch.randn(16, 4)
        x[:, 0] = x[:, 0].abs() + 0.1  # the Inf weight saturates the tanh: a finite loss
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        assert finite(model, opt), step  # never returned with an Inf weight
    assert opt.stats()["rollbacks"] == 1


def test_when_every_update_writes_nan_the_run_stops_with_finite_weights_and_a_true_message() -> (
    None
):
    model = make_model()
    opt = SafeOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2))
    first = next(model.parameters())
    corrupt_on(opt, set(range(1, 1000)), lambda: first.view(-1)[0].fill_(math.nan))
    with pytest.raises(DivergenceError) as caught:
        for step in range(50):
            opt.zero_grad()
            backward(model, step)
            opt.step()
            assert finite(model, opt), step
    message = str(caught.value)
    assert "the restored state failed again right away 3 times" in message
    # every update corrupted: the weights are the snapshot of step 0, nothing undone
    assert "The weights are those of the snapshot of step 0: 0 good update(s)" in message
    assert finite(model, opt)  # true: restored before stopping
    assert caught.value.stats["steps"] <= 5


@pytest.mark.parametrize("where", ["first_step", "add_param_group"])
def test_non_finite_weights_before_the_first_step_are_a_clear_error(where: str) -> None:
    model = make_model()
    opt = SafeOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    if where == "first_step":
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = math.nan
    else:
        backward(model, 0)
        opt.step()
        extra = nn.Parameter(torch.tensor([1.0, math.inf]))
        opt.add_param_group({"params": [extra]})
        extra.grad = torch.zeros(2)
    backward(model, 1)
    with pytest.raises(ValueError, match="not finite before stableopt's first step") as caught:
        opt.step()
    expected = "group 0 index 0 shape (16, 8)" if where == "first_step" else "group 1 index 0"
    assert expected in str(caught.value)


def checkpoint(
    steps: int = 3, clip: Any = "auto"
) -> tuple[nn.Module, SafeOptimizer, dict[str, Any]]:
    model = make_model()
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), clip=clip)
    for step in range(steps):
        opt.zero_grad()
        opt.observe_loss(backward(model, step))
        opt.step()
    return model, opt, copy.deepcopy(opt.state_dict())


def test_a_checkpoint_with_a_nan_exp_avg_is_refused_and_changes_nothing() -> None:
    _, _, state = checkpoint()
    state["state"][2]["exp_avg"].view(-1)[0] = math.nan
    model, opt, _ = checkpoint(steps=5)
    before, counters = snapshot(model, opt), dict(opt.monitor.counters)
    with pytest.raises(ValueError, match="non-finite 'exp_avg'.*group 0 index 2"):
        opt.load_state_dict(state)
    assert same_snapshot(before, snapshot(model, opt)) and opt.monitor.counters == counters


def test_a_refused_stage_leaves_the_inner_optimizer_as_it_was() -> None:
    _, _, state = checkpoint(clip="zscore")
    model = make_model()
    opt = SafeOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2), clip=ZScoreClip(warmup_steps=7)
    )
    backward(model, 0)
    opt.step()
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="warmup_norms"):
        opt.load_state_dict(state)  # a ZClip of another warm-up length
    assert same_snapshot(before, snapshot(model, opt))
    assert opt.optimizer.state[next(model.parameters())]["step"] == 1


def test_a_layer_that_grew_is_refused_naming_group_index_and_shape() -> None:
    """Same number of parameters, other shapes (8 units then 16): refused before any change."""

    def model_of(width: int) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 1))

    small = model_of(8)
    opt = SafeOptimizer(torch.optim.Adam(small.parameters(), lr=1e-2))
    small(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = opt.state_dict()
    big = model_of(16)
    big_opt = SafeOptimizer(torch.optim.Adam(big.parameters(), lr=1e-2))
    with pytest.raises(ValueError, match=r"group 0 index 0 \(shape \(16, 4\)\)"):
        big_opt.load_state_dict(state)
    assert not big_opt.optimizer.state  # nothing was loaded
    big(torch.randn(2, 4)).sum().backward()
    big_opt.step()  # and the optimizer still works


def test_global_optimizer_hooks_fire_once_per_step() -> None:
    model = make_model()
    opt = SafeOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    calls: list[tuple[str, str]] = []
    pre = register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("pre", type(o).__name__)))
    post = register_optimizer_step_post_hook(
        lambda o, a, k: calls.append(("post", type(o).__name__))
    )
    try:
        for step in range(3):
            opt.zero_grad()
            backward(model, step)
            opt.step()
    finally:
        pre.remove()
        post.remove()
    assert calls == [("pre", "SafeOptimizer"), ("post", "SafeOptimizer")] * 3


def test_a_partial_rollback_restores_exactly_the_corrupted_parameter() -> None:
    model = make_model()
    opt = SafeOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        rollback=Rollback(every_steps=2, scope="corrupted"),
    )
    first, *others = list(model.parameters())
    corrupt_on(opt, {5}, lambda: first.view(-1)[3].fill_(math.nan))
    saved: dict[int, Any] = {}
    for step in range(1, 6):
        opt.zero_grad()
        backward(model, step)
        before = [p.detach().clone() for p in others]
        opt.step()
        saved[step] = (first.detach().clone(), copy.deepcopy(opt.state[first]), before)
    # step 5's update of the first parameter is undone to the snapshot of good step 4 ...
    assert torch.equal(first, saved[4][0])
    assert torch.equal(opt.state[first]["exp_avg"], saved[4][1]["exp_avg"])
    # ... and every other parameter kept its step-5 update
    assert all(not torch.equal(p, b) for p, b in zip(others, saved[5][2]))
    assert finite(model, opt)


def test_by_default_a_rollback_restores_exactly_the_non_finite_entries() -> None:
    model = make_model()
    opt = SafeOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2), rollback=Rollback(every_steps=2)
    )
    assert opt.rollback is not None and opt.rollback.scope == "entries"
    first = next(model.parameters())
    corrupt_on(opt, {5}, lambda: first.view(-1)[3].fill_(math.nan))
    kept: dict[int, Any] = {}
    for step in range(1, 6):
        opt.zero_grad()
        backward(model, step)
        opt.step()
        kept[step] = first.detach().clone()
    # the corrupted entry is the snapshot's (good step 4), every other entry step 5's update
    after, snapshot = kept[5].view(-1), kept[4].view(-1)
    assert after[3] == snapshot[3]
    others = torch.ones_like(after, dtype=torch.bool)
    others[3] = False
    assert bool((after[others] != snapshot[others]).all())  # the step-5 update of the rest
    (event,) = [e for e in opt.events() if e.kind == "rollback"]
    assert (event.cause, event.labels["scope"]) == (Cause.UPDATE_WROTE_NONFINITE, "entries")
    assert (event.data["entries"], event.data["params"]) == (1.0, 1.0)
    assert opt.stats()["lr_factor"] == 1.0  # one corrupting update: restored, not cut
    assert finite(model, opt)


SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {root!r})
    from torch import nn
    from stableopt import SafeLoss, SafeOptimizer
    from tests.helpers import make_model, batch
    model = make_model()
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    loss_fn = SafeLoss(nn.MSELoss(), optimizer=opt)
    def run(steps):
        for step in steps:
            x, y = batch(step)
            opt.zero_grad()
            loss = loss_fn(model(x), y if step != 2 else y * float("nan"))
            loss.backward()
            opt.step()
    if sys.argv[1] == "save":
        run(range(4))
        torch.save({{"model": model.state_dict(), "opt": opt.state_dict()}}, sys.argv[2])
    else:
        saved = torch.load(sys.argv[2], weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        stats = opt.stats()
        print(stats["loss"], stats["grad_norm"], stats["nonfinite_losses"],
              loss_fn.stats()["nonfinite_losses"], stats["steps"])
    """
)


def test_stats_and_safe_loss_counters_survive_a_resume_in_a_new_process(tmp_path: Path) -> None:
    script = tmp_path / "resume.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    path = str(tmp_path / "ckpt.pt")
    subprocess.run([sys.executable, str(script), "save", path], check=True, capture_output=True)
    out = subprocess.run(
        [sys.executable, str(script), "load", path], check=True, capture_output=True, text=True
    ).stdout.split()
    loss, grad_norm, monitor_losses, safe_loss_losses, steps = out
    assert float(loss) > 0 and float(grad_norm) > 0  # the last step's numbers came back
    assert monitor_losses == safe_loss_losses == "1" and steps == "4"


def test_a_float64_run_trains_past_its_snapshots_and_skips_nan_steps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    for step in range(250):
        x = torch.randn(32, 8, dtype=torch.float64)
        opt.zero_grad()
        loss = (model(x) - x[:, :1].sin()).square().mean()
        opt.observe_loss(loss.detach())
        loss.backward()
        if step in (100, 200):
            next(model.parameters()).grad.view(-1)[0] = math.nan  # type: ignore[union-attr]
        opt.step()
    stats = opt.stats()
    assert stats["skipped_steps"] == 2 and stats["rollbacks"] == 0 and finite(model, opt)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # and it checkpoints
    assert buffer.tell() > 0


def test_the_finite_flags_are_exact_and_in_order_for_mixed_dtypes() -> None:
    """One flag per tensor, in order, against torch.isfinite: a tensor of huge finite values
    (whose sum of squares overflows) is finite; groups of other dtypes do not reorder them."""
    from stableopt.grad_norms import finite_flags

    tensors = [
        torch.full((10,), 3e38),  # finite, its L2 norm overflows float32
        torch.tensor([1.0, math.nan], dtype=torch.bfloat16),
        torch.ones(3, dtype=torch.float64),
        torch.tensor([1.0, math.inf]),
        torch.ones(2, dtype=torch.float16),
        torch.tensor([1.0, -math.inf], dtype=torch.float64),
        torch.tensor([1 + 1j, complex(math.nan, 0)], dtype=torch.complex64),
        torch.arange(3),  # integers: finite by construction
        torch.ones(0),
    ]
    expected = [bool(torch.isfinite(t).all()) for t in tensors]
    assert finite_flags(tensors).tolist() == expected == [
        True, False, True, False, True, False, False, True, True
    ]  # fmt: skip

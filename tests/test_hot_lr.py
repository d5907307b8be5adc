"""The hot-LR watch: a loss that climbs and stays above where the run started is a cut.

The rule is checked against a numpy transcription of its documented formula; its effect
against bare AdamW at a learning rate that ruins the run; its harmlessness against the
same wrapper without it (bit-identical weights on healthy runs, where it never fires).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from stableopt import HotLR, Rollback, SafeOptimizer
from stableopt.checkpoint import STATE_KEY
from stableopt.outcomes import Cause, EventKind

pytestmark = pytest.mark.usefixtures("decide_on")


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="stableopt")


# -- the rule, written out --------------------------------------------------------------


def numpy_cut_step(
    losses: np.ndarray,
    ratio: float = 2.0,
    noise_z: float = 3.0,
    first_noise_z: float = 8.0,
    window: int = 8,
    noise_window: int = 32,
    patience: int = 8,
    reference_steps: int = 3,
) -> int | None:
    """The first step (from 1) at which the documented rule cuts, or ``None``."""
    logs = np.log(losses)
    reference = float(np.median(logs[:reference_steps]))
    streak = 0
    for t in range(len(logs)):
        seen = logs[: t + 1]
        if t + 1 < max(reference_steps, window):
            continue
        level = np.median(seen[-window:])
        recent = seen[-noise_window:]
        noise = 1.4826 * np.median(np.abs(recent - np.median(recent)))
        floor = math.log(ratio)
        elevated = (level - reference > max(floor, noise_z * noise)) or (
            level - logs[0] > max(floor, first_noise_z * noise)
        )
        streak = streak + 1 if elevated else 0
        if streak >= patience:
            return t + 1
    return None


def policy_cut_step(policy: HotLR, losses: np.ndarray) -> int | None:
    for step, loss in enumerate(losses, start=1):
        change = policy.update(float(loss))
        if change is not None and change.kind == "lr_cut":
            return step
    return None


def climbing_losses(seed: int, climb_at: int, height: float, steps: int = 120) -> np.ndarray:
    """A noisy decreasing loss that jumps to ``height`` x its start at ``climb_at`` and stays."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    base = 2.0 * np.exp(-t / 60.0) + 0.5
    base[climb_at:] = base[0] * height
    return base * np.exp(rng.normal(0.0, 0.1, steps))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("height", [1.5, 3.0, 30.0])
def test_the_cut_step_is_the_documented_rule(seed: int, height: float) -> None:
    losses = climbing_losses(seed, climb_at=40, height=height)
    expected = numpy_cut_step(losses)
    assert policy_cut_step(HotLR(), losses) == expected
    if height >= 3.0:  # far above the start: caught once the noise window has seen it
        assert expected is not None and 40 < expected <= 40 + 32 + 8
    else:  # below ratio x the start: a loss that is merely worse is not hot
        assert expected is None


def test_a_first_update_that_ruins_the_model_is_judged_against_the_first_loss() -> None:
    # the median of the first three losses is already high: the first loss is the yardstick
    losses = np.concatenate([[1.0], np.full(60, 40.0)]) * np.exp(
        np.random.default_rng(0).normal(0, 0.02, 61)
    )
    expected = numpy_cut_step(losses)
    assert expected is not None and expected <= 16
    assert policy_cut_step(HotLR(), losses) == expected


def test_a_loss_without_a_log_scale_and_maximize_are_passed_over() -> None:
    policy = HotLR()
    for loss in [1.0, 1.0, 1.0] + [-5.0, 0.0, math.nan, math.inf] * 20:
        assert policy.update(loss) is None
    assert policy.reference == 0.0 and len(policy._logs) == 3
    climbing = HotLR()
    assert all(climbing.update(v, maximize=True) is None for v in [1.0] * 3 + [100.0] * 50)
    assert climbing.factor == 1.0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"factor": 1.0}, "factor"),
        ({"factor": 0.0}, "factor"),
        ({"ratio": 1.0}, "ratio"),
        ({"patience": 0}, "patience"),
        ({"noise_window": 2}, "noise_window"),
        ({"recovery_growth": 1.0}, "recovery_growth"),
        ({"min_lr": -1.0}, "min_lr"),
    ],
)
def test_bad_arguments_name_themselves(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        HotLR(**kwargs)


def test_a_wrong_type_for_the_stage_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="hot_lr"):
        SafeOptimizer(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), hot_lr=0.1)  # type: ignore[arg-type]


# -- on a real run -------------------------------------------------------------------------


def regression(seed: int = 0, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = torch.tanh(x @ torch.randn(16, 1, generator=g)) + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
    )


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    batch: int = 32,
    seed: int = 0,
    on_step: Any = None,
    weight: Any = None,
) -> list[float]:
    """``weight(step)``: a factor on the step's loss (a re-weighting the user chose)."""
    x, y = regression(seed)
    losses = []
    for step in range(steps):
        index = torch.randint(0, len(x), (batch,), generator=torch.Generator().manual_seed(step))
        loss = nn.functional.mse_loss(model(x[index]), y[index])
        if weight is not None:
            loss = loss * weight(step + 1)
        opt.zero_grad()
        loss.backward()
        if isinstance(opt, SafeOptimizer):
            opt.observe_loss(loss)
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1)
    return losses


def full_loss(model: nn.Module, seed: int = 0) -> float:
    x, y = regression(seed)
    with torch.no_grad():
        return nn.functional.mse_loss(model(x), y).item()


def test_a_hot_lr_is_cut_with_a_rollback_and_the_run_trains() -> None:
    lr, steps = 1.0, 150
    bare_model = mlp()
    losses = train(bare_model, torch.optim.AdamW(bare_model.parameters(), lr=lr), steps)
    bare = full_loss(bare_model)
    assert bare > losses[0]  # the LR ruins the run: it ends above where it started

    model = mlp()
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=lr))
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    train(
        model,
        opt,
        steps,
        on_step=lambda s: snapshots.__setitem__(s, copy.deepcopy(model.state_dict())),
    )
    cuts = [e for e in opt.events() if e.kind == "lr_cut"]
    assert len(cuts) >= 1
    assert opt.stats()["lr_factor"] == pytest.approx(HotLR().cut_factor ** len(cuts))
    assert opt.optimizer.param_groups[0]["lr"] == lr  # a multiplier, never written into the group
    # the cut restores a snapshot taken before the climb
    rollbacks = [e for e in opt.events() if e.kind == "rollback" and e.step == cuts[0].step]
    assert len(rollbacks) == 1 and rollbacks[0].cause is Cause.HOT_LR
    assert opt.stats()["rollbacks"] >= 1
    assert full_loss(model) < 0.25 * bare and full_loss(model) < losses[0]


def test_the_cut_event_carries_the_numbers_of_the_rule() -> None:
    policy = HotLR()
    losses = climbing_losses(0, climb_at=40, height=30.0)
    for loss in losses:
        change = policy.update(float(loss))
        if change is not None:
            break
    assert change is not None and change.kind is EventKind.LR_CUT and change.cause is Cause.HOT_LR
    step = numpy_cut_step(losses)
    assert step is not None
    seen = np.log(losses[:step])
    level = math.exp(float(np.median(seen[-8:])))
    reference = math.exp(float(np.median(seen[:3])))
    first = float(losses[0])
    # the data holds the level, the reference it exceeded (the median start or the first
    # loss, whichever by more of its margin), the climb and the cut
    assert change.data["level"] == pytest.approx(level)
    assert change.data["reference"] in (pytest.approx(reference), pytest.approx(first))
    assert change.data["climb"] == pytest.approx(level / change.data["reference"])
    assert change.data["patience"] == 8.0
    assert (change.old_factor, change.new_factor) == (1.0, pytest.approx(0.03))


@pytest.mark.parametrize(
    "name, build, batch",
    [
        ("AdamW", lambda p: torch.optim.AdamW(p, lr=1e-2), 32),
        ("AdamW batch 1", lambda p: torch.optim.AdamW(p, lr=3e-3), 1),
        ("SGD", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), 8),
        ("Adagrad", lambda p: torch.optim.Adagrad(p, lr=0.05), 4),
    ],
)
def test_healthy_runs_never_fire_and_are_bit_identical_to_the_wrapper_without_it(
    name: str, build: Any, batch: int
) -> None:
    with_watch, without = mlp(), mlp()
    opt = SafeOptimizer(build(with_watch.parameters()))
    train(with_watch, opt, 300, batch=batch)
    train(without, SafeOptimizer(build(without.parameters()), hot_lr=None), 300, batch=batch)
    assert not [e for e in opt.events() if e.kind in {"lr_cut", "lr_recovery"}]
    for a, b in zip(with_watch.parameters(), without.parameters(), strict=True):
        assert torch.equal(a, b)


def test_no_snapshot_is_taken_while_the_loss_is_elevated() -> None:
    weight = nn.Parameter(torch.zeros(3))
    opt = SafeOptimizer(
        torch.optim.SGD([weight], lr=0.1), clip=None, spike=None, rollback=Rollback(every_steps=20)
    )
    assert opt.rollback is not None
    climb = 12  # the loss jumps 50x after step 12; elevated from step 16, cut at 23
    losses = np.array([1.0 if step <= climb else 50.0 for step in range(1, 40)])
    snapshot_steps: list[int | None] = []
    for step in range(1, 40):
        weight.grad = torch.full((3,), 0.01)
        opt.observe_loss(float(losses[step - 1]))
        opt.step()
        if any(e.kind == "lr_cut" for e in opt.events()):
            break
        snapshot_steps.append(opt.rollback.snapshot_step)
    (cut,) = [e for e in opt.events() if e.kind == "lr_cut"]
    (rollback,) = [e for e in opt.events() if e.kind == "rollback"]
    assert cut.step == rollback.step == numpy_cut_step(losses) == 23
    # due at the 20th good step, while the level was elevated: deferred, so the cut
    # restores weights from before the climb (every accepted SGD step moves -0.001)
    snapshot = max(s for s in snapshot_steps if s is not None)
    assert snapshot <= climb
    assert torch.equal(weight.detach(), torch.zeros(3) - 0.001 * snapshot)


def test_resume_is_exact_and_an_older_state_dict_without_the_watch_loads() -> None:
    lr, steps, at = 1.0, 120, 40

    def build(model: nn.Module) -> SafeOptimizer:
        # the snapshot travels in the state dict: the cut after the resume restores it
        return SafeOptimizer(
            torch.optim.AdamW(model.parameters(), lr=lr), rollback=Rollback(in_state_dict=True)
        )

    def run(resume: bool) -> tuple[nn.Module, SafeOptimizer]:
        model = mlp()
        opt = build(model)
        x, y = regression()
        for step in range(steps):
            if resume and step == at:
                saved_model, saved_opt = copy.deepcopy(model.state_dict()), opt.state_dict()
                saved_opt = copy.deepcopy(saved_opt)
                model = mlp(seed=1)
                model.load_state_dict(saved_model)
                opt = build(model)
                opt.load_state_dict(saved_opt)
            index = torch.randint(0, len(x), (32,), generator=torch.Generator().manual_seed(step))
            loss = nn.functional.mse_loss(model(x[index]), y[index])
            opt.zero_grad()
            loss.backward()
            opt.observe_loss(loss)
            opt.step()
        return model, opt

    straight, straight_opt = run(False)
    resumed, resumed_opt = run(True)
    assert [(e.step, e.kind) for e in straight_opt.events()] == [
        (e.step, e.kind) for e in resumed_opt.events()
    ]
    assert any(e.kind == "lr_cut" and e.step > at for e in straight_opt.events())
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert straight_opt.hot_lr.state_dict() == resumed_opt.hot_lr.state_dict()  # type: ignore[union-attr]

    # a state dict written before the watch existed: the watch starts fresh
    model = mlp()
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    train(model, opt, 10)
    old = copy.deepcopy(opt.state_dict())
    del old[STATE_KEY]["stage_classes"]["hot_lr"]
    del old[STATE_KEY]["stages"]["hot_lr"]
    fresh = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    fresh.load_state_dict(old)
    assert fresh.hot_lr is not None and fresh.hot_lr.reference is None
    assert fresh.monitor.counters["steps"] == 10


def test_a_cut_composes_with_the_users_scheduler() -> None:
    weight = nn.Parameter(torch.zeros(3))
    inner = torch.optim.SGD([weight], lr=0.1)
    opt = SafeOptimizer(inner, clip=None, spike=None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    seen: dict[int, float] = {}
    inner.register_step_pre_hook(
        lambda o, a, k: seen.__setitem__(opt.monitor.counters["steps"], o.param_groups[0]["lr"])
    )
    for loss in [1.0] * 10 + [50.0] * 20:
        weight.grad = torch.full((3,), 0.01)
        opt.observe_loss(loss)
        opt.step()
        scheduler.step()
    (cut,) = [e for e in opt.events() if e.kind == "lr_cut"]
    for step, lr in seen.items():
        scheduled = 0.1 / (1 + step - 1)
        factor = HotLR().cut_factor if step > cut.step else 1.0
        assert lr == pytest.approx(scheduled * factor, rel=1e-12)
    assert inner.param_groups[0]["lr"] == pytest.approx(0.1 / (1 + 30))


def test_a_loss_reweighted_on_purpose_is_a_new_start_not_a_hot_lr() -> None:
    # from step 60 the user multiplies the loss by 1e4: the spike guard skips the first
    # steps, the escalation accepts the new level, and the watch starts from it
    model = mlp()
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    losses = train(model, opt, 200, weight=lambda step: 1e4 if step >= 60 else 1.0)
    kinds = {e.kind for e in opt.events()}
    assert "new_level" in kinds and "lr_cut" not in kinds
    assert opt.hot_lr is not None and opt.hot_lr.reference is not None
    assert math.exp(opt.hot_lr.reference) > 100 * losses[0]  # the re-weighted start


def test_the_recommendation_names_the_climb_and_the_lr_that_trained() -> None:
    lr = 1.0
    model = mlp()
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=lr))
    train(model, opt, 150)
    advice = {r.kind: r for r in opt.recommendations()}
    cuts = [e for e in opt.events() if e.kind == "lr_cut"]
    factor = opt.stats()["lr_factor"]
    hot = advice["hot_lr"]
    assert hot.evidence["hot_lr_cuts"] == len(cuts)
    assert hot.evidence["cut_lr"] == pytest.approx(lr * factor)
    assert (
        f"peak LR near {lr * factor:.3g}" in hot.message and f"steps {cuts[0].step}" in hot.message
    )
    # the rollback is put down to the hot LR, not to non-finite weights; no lower_lr advice
    # on top of it (that one is for repeated emergency cuts)
    assert advice["rollback"].evidence["hot_lr_rollbacks"] == 1
    assert "non-finite" not in advice["rollback"].message
    assert "lower_lr" not in advice

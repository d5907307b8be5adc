"""What the user reads: errors name the argument passed and what is accepted, a skip names its
cause, numbers in sentences are short, the log says when it thins out, steps count from 1."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import nn

from stableopt import EmergencyLR, Monitor, SafeLoss, SafeOptimizer
from stableopt.messages import event_text
from stableopt.monitor import Event
from stableopt.outcomes import EventKind, SkipReason
from tests.helpers import backward, make_model

# -- bad arguments ---------------------------------------------------------------------------


def adamw() -> torch.optim.Optimizer:
    return torch.optim.AdamW(make_model().parameters(), lr=1e-3)


@pytest.mark.parametrize("clip", [-1, 0, -0.5, float("nan"), float("inf")])
def test_a_bad_clip_number_names_clip_and_what_it_accepts(clip: float) -> None:
    with pytest.raises(ValueError) as caught:
        SafeOptimizer(adamw(), clip=clip)
    message = str(caught.value)
    assert message.startswith("clip must be ")
    assert "a finite positive number (a fixed max norm)" in message
    assert "'zscore'" in message and "None" in message
    assert "max_norm must" not in message  # the user passed clip=, not max_norm=
    assert message.endswith(f"got {clip!r}")


def test_a_bad_clip_name_or_type_names_clip() -> None:
    with pytest.raises(
        ValueError,
        match=r"^clip must be 'auto' \(the default\) or one of \['agc', 'outlier', 'percentile', 'zscore'\]",
    ):
        SafeOptimizer(adamw(), clip="zclip")
    with pytest.raises(TypeError, match=r"^clip must be .* got True$"):
        SafeOptimizer(adamw(), clip=True)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        ("emergency_clip", "emergency_clip must be an EmergencyClip "),
        ("emergency_lr", "emergency_lr must be an EmergencyLR "),
        ("escalation", "escalation must be an Escalation "),
        ("rollback", "rollback must be a Rollback "),
        ("spike", "spike must be a SpikeGuard "),
        ("plateau", "plateau must be a PlateauLR "),
    ],
)
def test_a_bad_stage_names_its_argument_with_the_right_article(
    argument: str, expected: str
) -> None:
    with pytest.raises(TypeError) as caught:
        SafeOptimizer(adamw(), **{argument: 3})
    message = str(caught.value)
    assert message.startswith(expected)
    assert "'default' or None" in message and "; got int, which has no " in message


# -- why a step was skipped ------------------------------------------------------------------


def skip_event(corrupt_loss: bool, corrupt_grads: bool) -> Event:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = SafeOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    loss = nn.functional.mse_loss(model(torch.randn(8, 4)), torch.randn(8, 1))
    loss.backward()
    if corrupt_grads:
        model.weight.grad[0, 0] = float("nan")
    opt.observe_loss(torch.tensor(float("inf")) if corrupt_loss else loss.detach())
    opt.step()
    (event,) = opt.events()
    assert event.kind == EventKind.SKIP
    return event


def test_an_inf_loss_with_finite_gradients_is_reported_as_the_loss() -> None:
    event = skip_event(corrupt_loss=True, corrupt_grads=False)
    assert event.cause is SkipReason.NONFINITE_LOSS
    assert event.data["loss"] == math.inf and math.isfinite(event.data["grad_norm"])


def test_an_inf_loss_whose_gradients_are_non_finite_names_the_loss_as_the_cause() -> None:
    # the ordinary way: an Inf in the targets makes the loss Inf, and its backward NaN
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = SafeOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    loss_fn = SafeLoss(nn.MSELoss(), optimizer=opt)
    target = torch.randn(8, 1)
    target[0, 0] = float("inf")
    loss_fn(model(torch.randn(8, 4)), target).backward()
    assert not bool(torch.isfinite(model.weight.grad).all())
    opt.step()
    (skip,) = [e for e in opt.events() if e.kind == "skip"]
    # the gradients are non-finite with the loss: the loss is named as the cause
    assert skip.cause is SkipReason.NONFINITE_GRADS
    assert skip.data["loss"] == math.inf and not math.isfinite(skip.data["grad_norm"])
    assert skip.reason == event_text(skip.kind, skip.cause, skip.data, skip.labels)
    assert skip.reason.startswith("the loss is NaN/Inf")


def test_nan_gradients_with_a_finite_loss_are_reported_as_the_gradients() -> None:
    event = skip_event(corrupt_loss=False, corrupt_grads=True)
    assert event.cause is SkipReason.NONFINITE_GRADS
    assert math.isfinite(event.data["loss"]) and math.isnan(event.data["grad_norm"])


# -- numbers in sentences ------------------------------------------------------------------------


def test_lr_factors_read_short_in_events_and_stay_exact_in_data() -> None:
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    corrupt = {"next": False}

    def write_nan(optimizer: Any, args: Any, kwargs: Any) -> None:
        if corrupt["next"]:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].view(-1)[0] = float("nan")

    inner.register_step_post_hook(write_nan)
    opt = SafeOptimizer(inner, emergency_lr=EmergencyLR(cooldown_steps=0, weight_faults=1))
    for step in range(14):
        opt.zero_grad()
        backward(model, step)
        corrupt["next"] = step in (10, 12)
        opt.step()
    cuts = [e for e in opt.events() if e.kind == "lr_cut"]
    assert [e.data["new_factor"] for e in cuts] == [0.1, 0.1 * 0.1]  # 0.010000000000000002
    assert cuts[1].reason.endswith("LR factor cut 0.1 -> 0.01")  # rendered short
    assert not [e for e in opt.events() if re.search(r"\d\.\d{7,}", e.reason)]


# -- the log thins out, and says so ------------------------------------------------------------


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("stableopt")]


def test_the_fifth_event_of_a_kind_says_the_rest_are_logged_every_100th(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="stableopt")
    model = make_model()
    opt = SafeOptimizer(torch.optim.SGD(model.parameters(), lr=1e-2))
    for step in range(420):
        opt.zero_grad()
        backward(model, step)
        if step % 2:  # every other step: never a failure streak
            next(model.parameters()).grad.view(-1)[0] = float("nan")
        opt.step()
    assert opt.stats()["skipped_steps"] == 210
    lines = messages(caplog)
    skips = [line for line in lines if line.startswith("step ") and ": skip: " in line]
    assert [int(line.split(":")[0].split()[1]) for line in skips] == [2, 4, 6, 8, 10, 200, 400]
    notices = [line for line in lines if "further skip events" in line]
    assert notices == [
        "skip: further skip events are logged only every 100th; all of them are counted in "
        "stats(), the recent ones are in events()"
    ]
    assert lines.index(notices[0]) == lines.index(skips[4]) + 1  # right after the 5th


class Broken:
    def on_event(self, event: Any) -> None: ...

    def on_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        raise RuntimeError("disk full")

    def close(self) -> None: ...


def test_a_failing_sink_says_once_that_its_failures_are_thinned_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="stableopt")
    model = make_model()
    monitor = Monitor(sinks=[Broken()], every_steps=1)
    opt = SafeOptimizer(torch.optim.SGD(model.parameters(), lr=1e-2), monitor=monitor)
    for step in range(8):
        opt.zero_grad()
        backward(model, step)
        opt.step()
    lines = messages(caplog)
    assert sum(line.startswith("sink Broken failed in on_metrics") for line in lines) == 5
    assert lines.count("sink Broken: further failures are logged only every 100th") == 1


# -- steps count from 1 ------------------------------------------------------------------------


def test_an_event_step_is_the_loop_index_plus_one_and_torch_counts_updates() -> None:
    model = make_model()
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    first = next(model.parameters())
    for i in range(60):  # the ordinary loop, counting from 0
        opt.zero_grad()
        backward(model, i)
        if i == 50:
            first.grad.view(-1)[0] = float("nan")
        opt.step()
        if i == 49:
            assert int(opt.state[first]["step"]) == 50  # torch: 1 after the first update
    (skip,) = opt.events()
    assert skip.step == 51  # loop index 50 is the 51st step() call
    assert opt.stats()["steps"] == 60
    assert int(opt.state[first]["step"]) == 59  # the skipped step did not update

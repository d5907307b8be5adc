"""SafeOptimizer is a torch.optim.Optimizer: the contract of the base class holds."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from stableopt import FixedClip, Rollback, SafeOptimizer
from stableopt.stages.emergency_clip import EmergencyClip
from tests.helpers import backward, make_model, twin


def make_opt(**kwargs: object) -> tuple[nn.Module, SafeOptimizer]:
    model = make_model()
    return model, SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), **kwargs)  # type: ignore[arg-type]


def test_is_an_optimizer_sharing_the_inner_objects() -> None:
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = SafeOptimizer(inner)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.optimizer is inner
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state
    assert opt.defaults is inner.defaults


def test_param_groups_and_state_follow_inner_after_load_state_dict() -> None:
    model, opt = make_opt()
    backward(model, 0)
    opt.step()
    saved = opt.state_dict()
    opt.load_state_dict(saved)
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.state is opt.optimizer.state
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.load_state_dict(saved)  # replaces the inner lists again
    opt.step()
    sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.005)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none: bool) -> None:
    model, opt = make_opt()
    backward(model, 0)
    opt.zero_grad(set_to_none=set_to_none)
    for p in model.parameters():
        if set_to_none:
            assert p.grad is None
        else:
            assert p.grad is not None and not p.grad.any()


def test_add_param_group_trains_new_params_like_bare() -> None:
    model, opt = make_opt(clip=None)
    reference = twin(model)
    bare = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    extra, extra_ref = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt.add_param_group({"params": [extra], "lr": 0.1})
    bare.add_param_group({"params": [extra_ref], "lr": 0.1})
    assert len(opt.optimizer.param_groups) == 2
    for step in range(5):
        for m, p, o in ((model, extra, opt), (reference, extra_ref, bare)):
            o.zero_grad()
            loss = backward(m, step)
            (p.square().sum() * loss).backward()
            o.step()
    assert torch.equal(extra, extra_ref)


def test_closure_runs_with_grad_enabled_and_its_loss_is_returned() -> None:
    model, opt = make_opt()
    seen = {}

    def closure() -> torch.Tensor:
        seen["grad_enabled"] = torch.is_grad_enabled()
        opt.zero_grad()
        return backward(model, 0)

    with torch.no_grad():
        loss = opt.step(closure)
    assert seen["grad_enabled"] is True
    assert isinstance(loss, torch.Tensor) and torch.isfinite(loss)
    assert opt.stats()["steps"] == 1


def test_step_hooks_run_around_step() -> None:
    model, opt = make_opt()
    calls: list[str] = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    post = opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    backward(model, 0)
    opt.step()
    assert calls == ["pre", "post"]
    pre.remove()
    post.remove()
    opt.step()
    assert calls == ["pre", "post"]


def test_repr_names_inner_and_stages() -> None:
    _, opt = make_opt(clip=1.0)
    text = repr(opt)
    assert "AdamW" in text and "FixedClip(max_norm=1)" in text and "Rollback(" in text


def test_pickle_round_trip_keeps_training() -> None:
    model, opt = make_opt(clip=1.0)
    for step in range(3):
        opt.zero_grad()
        backward(model, step)
        opt.step()
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)  # wraps opt.step with a closure
    clone = pickle.loads(pickle.dumps(opt))
    assert isinstance(clone, SafeOptimizer)
    assert clone.stats()["steps"] == 3
    assert clone.param_groups is clone.optimizer.param_groups
    for p in clone.optimizer.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    clone.step()
    assert clone.stats()["steps"] == 4


@pytest.mark.parametrize(
    "bad",
    [None, nn.Linear(2, 2), [torch.zeros(2, requires_grad=True)], torch.optim.AdamW, "adamw"],
    ids=["none", "model", "tensor-list", "class", "string"],
)
def test_wrapping_a_non_optimizer_is_a_type_error(bad: object) -> None:
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer instance"):
        SafeOptimizer(bad)  # type: ignore[arg-type]


def test_wrapping_twice_is_a_type_error() -> None:
    _, opt = make_opt()
    with pytest.raises(TypeError, match="already a SafeOptimizer"):
        SafeOptimizer(opt)


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"clip": -1.0}, ValueError, "max_norm"),
        ({"clip": 0}, ValueError, "max_norm"),
        ({"clip": "nonsense"}, ValueError, "clip must be .auto. .the default. or one of"),
        ({"clip": [1.0]}, TypeError, "clip must be"),
        ({"clip": True}, TypeError, "clip must be"),
        ({"max_consecutive_failures": 0}, ValueError, "max_consecutive_failures"),
        ({"max_consecutive_failures": 2.5}, TypeError, "max_consecutive_failures"),
        ({"rollback": "sometimes"}, TypeError, "rollback must be"),
        ({"emergency_clip": 3}, TypeError, "emergency_clip must be"),
        ({"check_weights": "yes"}, ValueError, "check_weights must be one of"),
        ({"check_weights": True}, ValueError, "check_weights must be one of"),
    ],
)
def test_bad_options_name_the_argument(
    kwargs: dict[str, object], error: type[Exception], names: str
) -> None:
    with pytest.raises(error, match=names):
        make_opt(**kwargs)


@pytest.mark.parametrize(
    ("build", "names"),
    [
        (lambda: Rollback(every_steps=0), "every_steps"),
        (lambda: Rollback(device="gpu"), r"device must be one of \['cpu', 'same'\]"),
        (lambda: EmergencyClip(threshold=-5), "threshold"),
        (lambda: EmergencyClip(factor=1.5), "factor"),
        (lambda: EmergencyClip(cooldown_steps=-1), "cooldown_steps"),
        (lambda: EmergencyClip(threshold=100, skip_above=10), "skip_above"),
        (lambda: FixedClip(float("nan")), "max_norm"),
    ],
)
def test_bad_stage_arguments_are_value_errors(build: object, names: str) -> None:
    with pytest.raises(ValueError, match=names):
        build()  # type: ignore[operator]


def test_stats_has_the_documented_keys() -> None:
    model, opt = make_opt(clip=1.0)
    backward(model, 0)
    opt.step()
    stats = opt.stats()
    for key in (
        "steps",
        "skipped_steps",
        "rollbacks",
        "total_clips",
        "emergency_clips",
        "lr_changes",
        "emergency_mode",
        "system_health",
        "grad_norm",
        "clip_threshold",
    ):
        assert key in stats
    assert stats["steps"] == 1 and stats["system_health"] == 1.0
    assert isinstance(stats["grad_norm"], float) and isinstance(stats["clip_threshold"], float)


@pytest.mark.parametrize("clip", [None, 1.0, "zscore", "percentile", "agc"])
def test_step_without_any_gradient_is_a_no_op(clip: object) -> None:
    model = make_model()
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), clip=clip)  # type: ignore[arg-type]
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.stats()["good_steps"] == 1

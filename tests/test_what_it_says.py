"""What a user reads is what happened: each message, count and number checked against the
run that produced it (the weights a stop leaves, a restore after ``add_param_group``, an
eps that underflows, a run without a loss, clips, step numbers, an expected length
mismatch, the clip threshold in ``stats()``)."""

from __future__ import annotations

import logging
import math
import re

import pytest
import torch
from torch import nn

from stableopt import ConsistencyLoss, DivergenceError, SafeLoss, SafeOptimizer
from stableopt.outcomes import Cause, EventKind, SkipReason
from tests.helpers import batch, make_model


def _step(model: nn.Module, opt: SafeOptimizer, step: int, loss_fn: SafeLoss | None = None) -> None:
    x, y = batch(step)
    out = model(x)
    loss = loss_fn(out, y) if loss_fn is not None else nn.functional.mse_loss(out, y)
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_a_stop_after_a_snapshot_restore_names_the_snapshot_and_the_updates_undone() -> None:
    model = make_model()
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    loss_fn = SafeLoss(nn.MSELoss(), optimizer=opt)
    initial = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(DivergenceError) as stop:
        for step in range(40):
            x, y = batch(step)
            out = model(x)
            if step >= 7:  # NaN outputs on every step after 7 good ones
                out = out * math.nan
            loss_fn(out, y).backward()
            opt.step()
            opt.zero_grad()
    found = re.search(
        r"snapshot of step (\d+): (\d+) good update\(s\) after it were undone \(the last good "
        r"step was step (\d+)\)",
        str(stop.value),
    )
    assert found is not None, str(stop.value)
    assert tuple(int(g) for g in found.groups()) == (0, 7, 7)
    # and they are: the snapshot of step 0 holds the initial weights
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), initial))
    assert "last good ones" not in str(stop.value)


def test_add_param_group_after_a_silent_corruption_restores_the_snapshotted_weights() -> None:
    body, head = nn.Linear(4, 4), nn.Linear(4, 1)
    head.requires_grad_(False)
    opt = SafeOptimizer(torch.optim.AdamW(body.parameters(), lr=1e-3))
    for _ in range(5):
        head(body(torch.randn(8, 4))).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    at_snapshot = opt.restorer.snapshot_step
    before = body.weight.detach().clone()
    with torch.no_grad():
        body.weight[0, 0] = math.nan  # a bit flip between steps
    head.requires_grad_(True)
    opt.add_param_group({"params": list(head.parameters())})  # unfreezing the head
    head(body(torch.randn(8, 4))).pow(2).mean().backward()
    opt.step()
    (restore,) = [e for e in opt.events() if e.kind == EventKind.ROLLBACK]
    assert restore.cause is Cause.NONFINITE_BETWEEN_STEPS and restore.step == 6
    assert (restore.data["entries"], restore.data["params"]) == (1.0, 1.0)
    assert restore.data["snapshot_step"] == at_snapshot
    assert "gradient norm" not in restore.reason  # no gradient was involved
    assert torch.isfinite(body.weight).all()
    assert torch.equal(body.weight[1:], before[1:])  # every finite value kept
    # the gradients came from the NaN weight: that step is skipped, the next one trains
    assert opt.events()[-1].cause is SkipReason.NONFINITE_GRADS
    opt.zero_grad()
    head(body(torch.randn(8, 4))).pow(2).mean().backward()
    opt.step()
    assert opt.last_verdict is not None and opt.last_verdict.is_accepted
    assert opt.restorer.snapshot_params == 4  # the new snapshot holds the head too


def test_add_param_group_refuses_only_a_new_parameter_with_no_good_state() -> None:
    body, head = nn.Linear(4, 4), nn.Linear(4, 1)
    opt = SafeOptimizer(torch.optim.SGD(body.parameters(), lr=0.1))
    body(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()
    with torch.no_grad():
        head.weight[0, 0] = math.inf
    opt.add_param_group({"params": list(head.parameters())})
    head(body(torch.randn(8, 4))).pow(2).mean().backward()
    with pytest.raises(ValueError, match=r"group 1 index 0 shape \(1, 4\)"):
        opt.step()


def test_an_eps_that_underflows_in_float16_is_named_at_construction_and_in_the_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(32, 1)).half()

    def loss(m: nn.Module) -> torch.Tensor:
        return m(torch.randint(0, 10, (16, 4))).float().pow(2).mean()

    plain = model()  # the premise: bare torch writes NaN weights at the first step
    bare = torch.optim.Adam(plain.parameters(), lr=1e-3, eps=1e-8)
    loss(plain).backward()
    bare.step()
    assert not all(torch.isfinite(p).all() for p in plain.parameters())

    caplog.set_level(logging.WARNING, logger="stableopt")
    guarded = model()
    opt = SafeOptimizer(torch.optim.Adam(guarded.parameters(), lr=1e-3, eps=1e-8))
    (warned,) = [r for r in caplog.records if "eps=" in r.getMessage()]
    assert re.search(r"eps=1e-08 of parameter group 0 is 0 in float16", warned.getMessage())
    with pytest.raises(DivergenceError) as stop:
        for _ in range(30):
            value = loss(guarded)
            value.backward()
            opt.observe_loss(value)
            opt.step()
            opt.zero_grad()
    assert "A likely cause: eps=1e-08 of parameter group 0 is 0 in float16" in str(stop.value)
    assert all(torch.isfinite(p).all() for p in guarded.parameters())
    caplog.clear()
    SafeOptimizer(torch.optim.Adam(model().parameters(), eps=1e-4))  # held by float16
    assert not [r for r in caplog.records if "eps=" in r.getMessage()]


def test_a_run_without_a_loss_says_so_once_and_lists_the_idle_stages(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="stableopt")
    model = make_model()
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert opt.stats()["inactive_stages"] == []  # nothing is known before a step
    for step in range(3):
        _step(model, opt, step)
    said = [r for r in caplog.records if "no loss seen" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert "SafeLoss(loss_fn, optimizer=opt)" in said[0].getMessage()
    assert opt.stats()["inactive_stages"] == ["spike (loss)", "hot_lr"]
    assert "inactive (no loss seen)=['spike (loss)', 'hot_lr']" in repr(opt)
    loss_fn = SafeLoss(nn.MSELoss(), optimizer=opt)
    _step(model, opt, 3, loss_fn)
    assert opt.stats()["inactive_stages"] == [] and "inactive" not in repr(opt)
    assert opt.stats()["loss"] is not None


def test_clips_are_logged_at_a_bounded_rate_and_reported_as_a_fraction(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="stableopt")
    model = make_model()
    reference = make_model()
    opt = SafeOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), clip=0.05)
    above = 0
    for step in range(120):
        x, y = batch(step)
        nn.functional.mse_loss(reference(x), y).backward()
        norm = nn.utils.clip_grad_norm_(reference.parameters(), math.inf)
        reference.zero_grad()
        with torch.no_grad():
            for p, q in zip(reference.parameters(), model.parameters()):
                p.copy_(q)
        _step(model, opt, step)
        above += int(norm > 0.05)
    stats = opt.stats()
    assert stats["total_clips"] == above > 100
    assert stats["clip_rate"] == pytest.approx(above / stats["good_steps"])
    clip_lines = [r for r in caplog.records if re.match(r"step \d+: clip: ", r.getMessage())]
    assert len(clip_lines) == 5 + above // 100  # the first 5, then every 100th
    assert re.search(r"clip threshold 0\.05: scaled by", clip_lines[0].getMessage())


def test_safe_loss_events_carry_the_number_of_the_step_they_feed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = make_model()
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    loss_fn = SafeLoss(nn.MSELoss(), optimizer=opt, time_dim=1)
    x, y = batch(0)
    loss_fn(model(x), torch.cat([y, y], dim=1))  # before any step: the first step's
    for step in range(1, 3):
        _step(model, opt, step, loss_fn)
    x, y = batch(3)
    loss_fn(model(x) * math.nan, torch.cat([y, y], dim=1)).backward()  # before step() no. 3
    opt.step()
    numbered = {(e.kind, e.step) for e in opt.events()}
    assert (EventKind.SIZE_MISMATCH, 1) in numbered
    assert (EventKind.SIZE_MISMATCH, 3) in numbered
    assert (EventKind.SKIP, 3) in numbered  # the step it fed carries the same number
    assert opt.stats()["steps"] == 3


def test_an_expected_length_mismatch_is_only_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="stableopt")
    torch.manual_seed(0)
    coarse, fine = nn.Conv1d(4, 4, 3, padding=1), nn.Conv1d(4, 4, 3, padding=1)
    opt = SafeOptimizer(torch.optim.Adam([*coarse.parameters(), *fine.parameters()], lr=1e-3))
    ddc = ConsistencyLoss(0.5, optimizer=opt, on_mismatch="expected")
    mel = SafeLoss(nn.L1Loss(), optimizer=opt)
    for _ in range(6):
        x = torch.randn(2, 4, 40)
        fine_out = fine(x)
        coarse_out = coarse(x)[..., ::2].repeat_interleave(2, dim=-1)[..., : 42 - 4]  # 38 frames
        total = mel(fine_out, x) + ddc(fine_out, coarse_out)
        total.backward()
        opt.step()
        opt.zero_grad()
    stats = opt.stats()
    assert (stats["expected_mismatches"], stats["size_mismatches"]) == (6, 0)
    assert ddc.stats()["expected_mismatches"] == 6
    assert not [e for e in opt.events() if e.kind == EventKind.SIZE_MISMATCH]
    assert not [r for r in caplog.records if "mismatch" in r.getMessage()]
    assert "size_mismatch" not in {a.kind for a in opt.recommendations()}
    # the value is the trimmed one, as "trim" computes it
    expected = 0.5 * nn.functional.mse_loss(fine_out[..., :38], coarse_out.detach())
    assert torch.equal(ddc(fine_out, coarse_out), expected)


@pytest.mark.parametrize("clip", ["auto", "zscore"])
def test_the_clip_threshold_in_stats_is_the_norm_above_which_a_step_is_clipped_now(
    clip: str,
) -> None:
    model = make_model()
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), clip=clip)
    loss_fn = SafeLoss(nn.MSELoss(), optimizer=opt)
    for step in range(80):
        _step(model, opt, step, loss_fn)
    threshold = opt.stats()["clip_threshold"]
    assert math.isfinite(threshold) and threshold > 0
    # a gradient 1.5x that norm is clipped to at most it; one at half of it is not touched
    for factor, clipped in ((1.5, True), (0.5, False)):
        x, y = batch(1000)
        loss_fn(model(x), y).backward()
        norm = float(nn.utils.clip_grad_norm_(model.parameters(), math.inf))
        for p in model.parameters():
            assert p.grad is not None
            p.grad.mul_(factor * threshold / norm)
        opt.step()
        opt.zero_grad()
        verdict = opt.last_verdict
        assert verdict is not None and verdict.is_accepted
        assert verdict.is_clipped is clipped
        if clipped:
            assert verdict.clip_threshold is not None
            assert verdict.clip_threshold <= threshold * (1 + 1e-6)
        threshold = opt.stats()["clip_threshold"]

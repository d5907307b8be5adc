"""What "exact resume" means (docs/checkpoints.md): with ``Rollback(in_state_dict=True)`` a
resumed run matches an uninterrupted one bit for bit even when a rollback comes right after
the resume, before the resumed run has taken a snapshot of its own; with the default the
rollback lands on the resume point instead, and the two runs part."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from torch import nn

from stableopt import Rollback, SafeOptimizer
from tests.helpers import backward, make_model

pytestmark = pytest.mark.usefixtures("decide_on")

EVERY = 8  # a snapshot after good steps 8, 16, ...
SAVE_AT = 12  # the checkpoint: 12 steps run, 4 good steps after the last snapshot
CORRUPT = SAVE_AT  # the first step after the resume (loop index 12) writes NaN into a weight
STEPS = 24


def build(
    in_state_dict: bool, init_seed: int = 0
) -> tuple[nn.Module, SafeOptimizer, dict[str, bool]]:
    model = make_model(init_seed)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    corrupt = {"next": False}

    def corrupt_hook(optimizer: Any, args: Any, kwargs: Any) -> None:
        if corrupt["next"]:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].view(-1)[0] = float("nan")

    inner.register_step_post_hook(corrupt_hook)
    opt = SafeOptimizer(inner, rollback=Rollback(every_steps=EVERY, in_state_dict=in_state_dict))
    return model, opt, corrupt


def train(model: nn.Module, opt: SafeOptimizer, corrupt: dict[str, bool], steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        backward(model, step)
        corrupt["next"] = step == CORRUPT
        opt.step()


def checkpoint_round_trip(model: nn.Module, opt: SafeOptimizer) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    return dict(torch.load(buffer, weights_only=False))


def rollbacks(opt: SafeOptimizer) -> list[tuple[int, float]]:
    return [(e.step, e.data["snapshot_step"]) for e in opt.events() if e.kind == "rollback"]


@pytest.mark.parametrize("in_state_dict", [True, False], ids=["in_state_dict", "default"])
def test_a_rollback_right_after_the_resume(in_state_dict: bool) -> None:
    reference, ref_opt, ref_corrupt = build(in_state_dict)
    train(reference, ref_opt, ref_corrupt, range(STEPS))
    # uninterrupted: step 13 (loop index 12) is rolled back to the snapshot of step 8
    assert rollbacks(ref_opt) == [(CORRUPT + 1, EVERY)]

    model, opt, corrupt = build(in_state_dict)
    train(model, opt, corrupt, range(SAVE_AT))
    saved = checkpoint_round_trip(model, opt)
    model, opt, corrupt = build(in_state_dict, init_seed=123)  # other weights: the load matters
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    train(model, opt, corrupt, range(SAVE_AT, STEPS))

    params = list(zip(model.parameters(), reference.parameters()))
    assert all(bool(torch.isfinite(p).all()) for p, _ in params)
    if in_state_dict:
        assert rollbacks(opt) == rollbacks(ref_opt)
        assert all(torch.equal(p, q) for p, q in params)
        for p, q in params:
            assert opt.state[p].keys() == ref_opt.state[q].keys()
            assert all(torch.equal(opt.state[p][k], v) for k, v in ref_opt.state[q].items())
        assert opt.stats() == ref_opt.stats()
    else:
        # the documented caveat: the loaded state is the snapshot, so the rollback lands on
        # the resume point (step 12), not on the uninterrupted run's snapshot (step 8)
        assert rollbacks(opt) == [(CORRUPT + 1, SAVE_AT)]
        assert not all(torch.equal(p, q) for p, q in params)

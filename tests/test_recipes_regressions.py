"""The defaults on training recipes written the way their authors wrote them (the loops of
``benchmarks/recipes_*``), healthy: nothing misfires. Each test runs the recipe's own loop
twice, as written and with SafeOptimizer, on the same seed, and compares the held-out loss
(eval mode) and counts the interventions.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from benchmarks.recipes_base import RecipeRun
from benchmarks.recipes_gpt import build_nanogpt
from benchmarks.recipes_resnet import build_resnet
from benchmarks.recipes_tacotron import build_tacotron
from stableopt import SafeOptimizer


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def safe(inner: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return SafeOptimizer(inner)


def interventions(run: RecipeRun) -> dict[str, int]:
    assert run.safe is not None
    stats = run.safe.stats()
    keys = ("skipped_steps", "rollbacks", "lr_changes", "total_clips", "new_levels")
    return {k: stats[k] for k in keys}


def test_nanogpt_with_its_own_clip_kept_has_no_false_skip() -> None:
    """nanoGPT's char recipe clips at 1.0 before ``scaler.step(optimizer)``: the norms the
    optimizer sees are pinned at the ceiling for the first steps, then return to it now and
    then. Those returns were skipped as spikes (a spread of ~0 on a pinned history)."""
    written = build_nanogpt(0, steps=100).run()
    swapped = build_nanogpt(0, wrap=safe, steps=100)
    outcome = swapped.run()
    assert not outcome.died and written.own_clips > 10  # the user's clip was active
    assert interventions(swapped) == dict.fromkeys(interventions(swapped), 0)
    assert outcome.final <= 1.01 * written.final


@pytest.mark.parametrize("sub_recipe", ["sgd", "nesterov"])
def test_a_batchnorm_resnet_with_sgd_is_left_alone(sub_recipe: str) -> None:
    """torchvision's reference (no clip): the defaults clip and skip nothing of a healthy
    run; the adaptive clip that clipped 13-16% of such a run's steps is not the default."""
    written = build_resnet(sub_recipe, 1, steps=100).run()
    swapped = build_resnet(sub_recipe, 1, wrap=safe, steps=100)
    outcome = swapped.run()
    assert interventions(swapped) == dict.fromkeys(interventions(swapped), 0)
    assert outcome.final == pytest.approx(written.final, rel=1e-5)


def test_tacotron_with_a_summed_mel_loss_is_left_alone() -> None:
    """A sum-reduced mel loss: norms in the thousands, rising while attention aligns. The
    defaults without the recipe's clip do what the recipe without its clip does."""
    written = build_tacotron("sum", 0, keep_clip=False).run()
    swapped = build_tacotron("sum", 0, wrap=safe, keep_clip=False)
    outcome = swapped.run()
    counts = interventions(swapped)
    assert counts["skipped_steps"] == counts["rollbacks"] == counts["lr_changes"] == 0
    assert outcome.final <= 1.01 * written.final


@pytest.mark.parametrize("situation", ["mean", "ddc"])
def test_tacotron_keeping_or_handing_over_its_clip_trains_as_written(situation: str) -> None:
    """NVIDIA's Tacotron 2 clips at 1.0 on every step (norms in the thousands): keeping the
    line, or passing it as clip=1.0, trains exactly as the recipe does (the adaptive clip
    the recipe's clip was replaced by ended 10-26% worse). Each run is built and run in turn:
    the recipe seeds the global RNG its dropout draws from."""
    written = build_tacotron(situation, 0).run()
    for wrap, keep_clip in ((safe, True), (lambda inner: SafeOptimizer(inner, clip=1.0), False)):
        swapped = build_tacotron(situation, 0, wrap=wrap, keep_clip=keep_clip)
        outcome = swapped.run()
        counts = interventions(swapped)
        assert counts["skipped_steps"] == counts["rollbacks"] == counts["lr_changes"] == 0
        assert outcome.final == written.final  # bit for bit clip_grad_norm_


def full_batch() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x @ torch.randn(8, 1)).sin()
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1)), x, y


@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
def test_lbfgs_on_a_full_batch_is_not_judged_like_a_noisy_optimizer(
    line_search: str | None,
) -> None:
    """LBFGS over full-batch gradients: a norm that falls smoothly toward convergence made an
    ordinary step read as far above the recent level (skips, emergency clips). Its defaults
    leave it bit-identical to bare LBFGS."""
    model, x, y = full_batch()
    twin = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    twin.load_state_dict(model.state_dict())
    opt = SafeOptimizer(torch.optim.LBFGS(model.parameters(), lr=0.5, line_search_fn=line_search))
    bare = torch.optim.LBFGS(twin.parameters(), lr=0.5, line_search_fn=line_search)
    for _ in range(60):
        for net, optimizer in ((model, opt), (twin, bare)):

            def closure(net: nn.Module = net, optimizer: Any = optimizer) -> torch.Tensor:
                optimizer.zero_grad()
                loss = nn.functional.mse_loss(net(x), y)
                loss.backward()
                return loss

            optimizer.step(closure)
    stats = opt.stats()
    assert stats["skipped_steps"] == stats["total_clips"] == stats["rollbacks"] == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    with torch.no_grad():
        assert math.isfinite(float(nn.functional.mse_loss(model(x), y)))

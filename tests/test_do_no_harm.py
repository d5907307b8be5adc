"""Do no harm: on healthy runs the defaults change nothing that plain torch would not, whatever
the scale of the loss, and isolated faults never add up to a false divergence.

Each case of the issue that broke the old defaults is here against plain torch or a
hand-written loop: a summed loss over a big batch, targets in raw units, a loss that moves
to a new level for good, NaNs on every 7th step, explosions on every 6th, a NaN batch every
25 steps with a corrupting update, BatchNorm with Nesterov SGD, a norm that grows all run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from stableopt import SafeOptimizer, ZScoreClip
from stableopt.stages import StepNumbers
from stableopt.testing.faults import RegressionTask, make_mlp

STEPS = 300


@pytest.fixture(autouse=True)
def quiet(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.ERROR, logger="stableopt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def regression(
    make_opt: Callable[[Any], Any],
    *,
    steps: int = STEPS,
    batch_size: int = 64,
    reduction: str = "mean",
    scale: float = 1.0,
    loss_factor: Callable[[int], float] = lambda step: 1.0,
    grad_fault: Callable[[int], float | None] = lambda step: None,
    skip_non_finite: bool = False,
    clip: float | None = None,
    seed: int = 0,
) -> tuple[float, Any]:
    """Train the fault-injection MLP; return the held-out MSE (unscaled loss) and the optimizer.

    ``grad_fault(step)``: a factor for the gradients, or NaN for one entry. With
    ``skip_non_finite`` the loop is the hand-written guard: ``if not finite: continue``.
    """
    task = RegressionTask(batch_size=batch_size, seed=seed)
    model = task.make_model()
    opt = make_opt(model.parameters())
    for step in range(1, steps + 1):
        x, y = task.batch(step)
        opt.zero_grad()
        loss = F.mse_loss(model(x), y * scale, reduction=reduction) * loss_factor(step)
        if isinstance(opt, SafeOptimizer):
            opt.observe_loss(loss.detach())
        loss.backward()
        fault = grad_fault(step)
        if fault is not None and math.isnan(fault):
            next(model.parameters()).grad.view(-1)[0] = math.nan  # type: ignore[union-attr]
        elif fault is not None:
            for p in model.parameters():
                p.grad.mul_(fault)  # type: ignore[union-attr]
        if skip_non_finite and not all(torch.isfinite(p.grad).all() for p in model.parameters()):
            continue
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    with torch.no_grad():
        x, y = task.held_out()
        return float(F.mse_loss(model(x), y * scale)) / scale**2, opt


def adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2)


def safe(params: Any) -> SafeOptimizer:
    return SafeOptimizer(torch.optim.AdamW(params, lr=1e-2))


def interventions(opt: SafeOptimizer) -> dict[str, int]:
    stats = opt.stats()
    cuts = sum(e.kind == "lr_cut" for e in opt.events())
    return {"rollbacks": stats["rollbacks"], "lr_cuts": cuts, "skipped": stats["skipped_steps"]}


@pytest.mark.parametrize(
    "case",
    [
        {"reduction": "sum", "batch_size": 256},  # healthy norms in the thousands
        {"scale": 1e4},  # targets in raw physical units
        {"scale": 1e-4},
    ],
    ids=["sum_b256", "units_x1e4", "units_x1e-4"],
)
def test_large_or_small_healthy_norms_are_left_alone(case: dict[str, Any]) -> None:
    plain, _ = regression(adamw, **case)
    guarded, opt = regression(safe, **case)
    assert interventions(opt) == {"rollbacks": 0, "lr_cuts": 0, "skipped": 0}
    assert guarded <= 1.02 * plain, (guarded, plain)


def scaled_run(
    factor: float, eps: float, clip: str = "zscore"
) -> tuple[list[bool], list[str], list[Tensor]]:
    """SafeOptimizer(Adam) on the loss times ``factor``: which steps it clipped, its events."""
    task = RegressionTask(seed=1)
    model = task.make_model()
    opt = SafeOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2, eps=eps), clip=clip)
    clipped = []
    for step in range(1, STEPS + 1):
        x, y = task.batch(step)
        opt.zero_grad()
        loss = F.mse_loss(model(x), y) * factor
        opt.observe_loss(loss.detach())
        loss.backward()
        opt.step()
        assert opt.last_verdict is not None
        clipped.append(opt.last_verdict.is_clipped)
    return clipped, [e.kind for e in opt.events()], [p.detach().clone() for p in model.parameters()]


def reference_run(factor: float, eps: float, zclip: bool = True) -> list[Tensor]:
    """Adam + the same ZClip policy (or none), as a plain loop with clip_grad_norm_."""
    task = RegressionTask(seed=1)
    model = task.make_model()
    inner = torch.optim.Adam(model.parameters(), lr=1e-2, eps=eps)
    policy = ZScoreClip()
    for step in range(1, STEPS + 1):
        x, y = task.batch(step)
        inner.zero_grad()
        (F.mse_loss(model(x), y) * factor).backward()
        if zclip:
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
            torch.nn.utils.clip_grad_norm_(model.parameters(), policy.max_norm(float(norm)))
            policy.observe(StepNumbers(float(norm)))
        inner.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("factor", [1e-6, 1.0, 1e6])
def test_at_any_scale_the_defaults_leave_a_healthy_run_bit_identical_to_plain_adam(
    factor: float,
) -> None:
    """The default clip (``"auto"``: outliers only) touches no step of a healthy run, at any
    scale of the loss: no event, no clip, and the weights are plain Adam's bit for bit."""
    clipped, kinds, weights = scaled_run(factor, eps=1e-8, clip="auto")
    assert kinds == [] and sum(clipped) == 0
    for ours, theirs in zip(weights, reference_run(factor, eps=1e-8, zclip=False)):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("factor", [1e-6, 1e-3, 1.0, 1e3, 1e6])
def test_at_any_scale_the_run_is_plain_adam_with_the_same_clipping(factor: float) -> None:
    """The loss times 1e-6 .. 1e6 from step 0: no guard fires (no skip, no emergency, no LR
    change: only the clip policy's own clips), and the run is Adam + the same ZClip policy
    written as a plain loop, up to float rounding."""
    clipped, kinds, weights = scaled_run(factor, eps=1e-8)
    assert kinds == [] and sum(clipped) >= 3, kinds  # the policy clipped: not vacuous
    for ours, theirs in zip(weights, reference_run(factor, eps=1e-8)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6 * 1e-2)


def test_the_decisions_do_not_depend_on_the_scale_of_the_loss() -> None:
    """With an inner optimizer that is itself scale-free (Adam with a negligible eps), the
    same steps are clipped at 1e-3, 1 and 1e3. (Further out, Adam's eps and
    clip_grad_norm_'s +1e-6 on the norm are no longer negligible: plain Adam itself then
    runs differently, which the test above covers.)"""
    base, _, _ = scaled_run(1.0, eps=1e-30)
    for factor in (1e-3, 1e3):
        assert scaled_run(factor, eps=1e-30)[0] == base, factor


def test_a_persistent_jump_in_scale_is_learned_not_fought() -> None:
    """200 healthy steps, then the loss x1e5 for good: three suspect steps are skipped, the
    new level is taken, and the run ends within 5% of plain AdamW (which is scale-free)."""
    jump: Callable[[int], float] = lambda step: 1e5 if step > 200 else 1.0  # noqa: E731
    plain, _ = regression(adamw, loss_factor=jump)
    guarded, opt = regression(safe, loss_factor=jump)
    assert interventions(opt) == {"rollbacks": 0, "lr_cuts": 0, "skipped": 3}
    assert opt.stats()["new_levels"] == 1
    assert next(e.step for e in opt.events() if e.kind == "new_level") == 203
    assert guarded <= 1.05 * plain, (guarded, plain)


def every(n: int, value: float) -> Callable[[int], float | None]:
    return lambda step: value if step % n == 0 else None


def test_a_nan_every_7th_step_is_skipped_every_time_and_never_adds_up() -> None:
    hand_written, _ = regression(adamw, grad_fault=every(7, math.nan), skip_non_finite=True)
    guarded, opt = regression(safe, grad_fault=every(7, math.nan))
    assert interventions(opt) == {"rollbacks": 0, "lr_cuts": 0, "skipped": STEPS // 7}
    assert guarded <= 1.02 * hand_written, (guarded, hand_written)


def test_an_explosion_every_6th_step_never_adds_up() -> None:
    clean, _ = regression(adamw)
    clipped_loop, _ = regression(adamw, grad_fault=every(6, 1e4), clip=1.0)
    guarded, opt = regression(safe, grad_fault=every(6, 1e4))
    counts = interventions(opt)
    assert counts["rollbacks"] == 0 and counts["lr_cuts"] == 0 and opt.stats()["new_levels"] == 0
    assert math.isfinite(guarded) and guarded <= 1.1 * clean, (guarded, clean)
    assert guarded <= clipped_loop


def test_a_nan_batch_every_25_steps_and_a_corrupting_update_do_not_diverge() -> None:
    task_steps = STEPS
    model_holder: dict[str, nn.Module] = {}

    def make(params: Any) -> SafeOptimizer:
        params = list(params)
        opt = SafeOptimizer(torch.optim.AdamW(params, lr=1e-2))

        def corrupt(optimizer: Any, args: Any, kwargs: Any) -> None:
            if opt.monitor.counters["steps"] == 160:
                with torch.no_grad():
                    params[0].view(-1)[0] = math.nan

        opt.optimizer.register_step_post_hook(corrupt)
        model_holder["params"] = params  # type: ignore[assignment]
        return opt

    guarded, opt = regression(make, steps=task_steps, grad_fault=every(25, math.nan))
    counts = interventions(opt)
    # the update's fault, once: its NaN entry restored, the LR left alone (a second corrupting
    # update within 20 steps would cut it)
    assert counts["rollbacks"] == 1 and counts["lr_cuts"] == 0
    assert opt.stats()["steps"] == task_steps and math.isfinite(guarded)


def test_batchnorm_with_nesterov_sgd_trains_as_plain_sgd() -> None:
    """A small BatchNorm CNN, SGD (momentum 0.9, Nesterov, lr 0.05), batch 64, warm-up then
    cosine: natural noise is not taken for spikes."""

    def run(wrap: bool) -> tuple[float, Any]:
        generator = torch.Generator().manual_seed(0)
        teacher = torch.randn(3 * 8 * 8, 4, generator=generator)
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32, 4),
        )
        inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        opt: Any = SafeOptimizer(inner) if wrap else inner
        warmup, total = 20, 300

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        for step in range(total):
            g = torch.Generator().manual_seed(1000 + step)
            x = torch.randn(64, 3, 8, 8, generator=g)
            y = (x.flatten(1) @ teacher).argmax(1)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if wrap:
                opt.observe_loss(loss.detach())
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        g = torch.Generator().manual_seed(99)
        x = torch.randn(512, 3, 8, 8, generator=g)
        with torch.no_grad():
            return float(F.cross_entropy(model(x), (x.flatten(1) @ teacher).argmax(1))), opt

    plain, _ = run(False)
    guarded, opt = run(True)
    counts = interventions(opt)
    assert counts["rollbacks"] == 0 and counts["lr_cuts"] == 0
    assert counts["skipped"] <= 1  # at most 0.5% of 300 steps
    assert guarded <= 1.05 * plain, (guarded, plain)


def test_a_norm_that_grows_all_run_is_not_a_spike() -> None:
    """Rprop maximizing a Gaussian log-likelihood whose variance may shrink towards 1e-6:
    the gradient norm grows all run."""
    task = RegressionTask(batch_size=256, seed=0)
    x, y = task.batch(1)  # full batch
    model = make_mlp(8, 32, 2, seed=0)
    opt = SafeOptimizer(torch.optim.Rprop(model.parameters(), lr=1e-2, maximize=True))
    norms = []
    for _ in range(300):
        opt.zero_grad()
        out = model(x)
        mean, log_var = out[:, :1], out[:, 1:].clamp(min=math.log(1e-6))
        log_likelihood = -0.5 * (log_var + (y - mean) ** 2 / log_var.exp()).mean()
        opt.observe_loss(log_likelihood.detach())
        log_likelihood.backward()
        opt.step()
        assert opt.last_verdict is not None
        norms.append(opt.last_verdict.grad_norm)
    assert sorted(norms[-50:])[25] > 2 * sorted(norms[:50])[25]  # the norm really grows
    assert interventions(opt) == {"rollbacks": 0, "lr_cuts": 0, "skipped": 0}, opt.events()[:3]

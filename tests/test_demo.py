"""The demo and the fault-injection toolkit it shares with the benchmark.

The demo's claims are checked on its data (``run_demo``), not its text; each
fault kind is checked against the same step run without the fault.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import Optimizer

from stableopt import SafeOptimizer
from stableopt.cli import main
from stableopt.demo import DemoResult, demo_schedule, format_report, run_demo
from stableopt.outcomes import Cause, SkipReason
from stableopt.testing import (
    FAULT_KINDS,
    FaultInjector,
    FaultSchedule,
    RegressionTask,
    inner_optimizer,
    make_mlp,
    run_training,
)

# 150 steps: the last snapshot (after 100 good steps) comes before the nan_weights
# fault at step 128, so the rollback does not land on the untrained model.
STEPS = 150
SANE_FACTOR = 3.0


@pytest.fixture(scope="module")
def demo() -> DemoResult:
    return run_demo(steps=STEPS, seed=0)


@pytest.fixture(scope="module")
def clean_safe_loss() -> float:
    clean = run_demo(steps=STEPS, seed=0, schedule=FaultSchedule())
    return clean.method("SafeOptimizer").held_out_loss


# -- the demo ----------------------------------------------------------------------------


def test_demo_plain_adamw_ends_nan(demo: DemoResult) -> None:
    plain = demo.method("AdamW")
    (nan_grad_step,) = demo.schedule.steps_of("nan_grad")
    assert math.isnan(plain.held_out_loss)
    assert plain.first_nonfinite_step == nan_grad_step + 1  # the step after the NaN update
    assert plain.stats is None and plain.events == [] and plain.error is None


def test_demo_safe_optimizer_survives_every_fault(demo: DemoResult) -> None:
    safe = demo.method("SafeOptimizer")
    assert safe.is_finite and safe.broken_since is None and safe.error is None
    # the default weight check undoes a corrupting update in the same step: no step of the
    # run ever sees a NaN weight (its loss would be NaN)
    assert [
        step
        for step, loss in enumerate(safe.losses, 1)
        if not math.isfinite(loss) and demo.schedule.at(step) != "inf_loss"
    ] == []
    assert safe.stats is not None
    # the gradient spike (x1e5, an ordinary loss) is far above the norm's level: skipped
    assert (safe.stats["steps"], safe.stats["rollbacks"]) == (STEPS, 1)
    spike_step = demo.schedule.steps_of("grad_spike")[0]
    assert safe.stats["spike_clips"] == 0
    (spike,) = [e for e in safe.events if e.kind == "skip" and e.step == spike_step]
    assert spike.cause is SkipReason.GRAD_NORM_SPIKE
    expected = [
        (demo.schedule.steps_of("nan_grad")[0], "skip"),
        (demo.schedule.steps_of("inf_loss")[0], "skip"),
        (spike_step, "skip"),
        (demo.schedule.steps_of("nan_weights")[0], "rollback"),
    ]
    fault_steps = {step for step, _ in expected}
    interventions = [(e.step, e.kind) for e in safe.events if e.kind in ("skip", "rollback")]
    assert [i for i in interventions if i[0] in fault_steps] == expected
    # Beyond the faults, at most a rare spike skip on natural batch noise.
    others = [e for e in safe.events if e.kind == "skip" and e.step not in fault_steps]
    assert len(others) <= 1 and all(e.cause is SkipReason.LOSS_SPIKE for e in others)
    assert safe.stats["skipped_steps"] == 3 + len(others)
    # Isolated bad batches are skipped without an LR cut; the one corrupted update (found
    # as non-finite weights) is restored entry by entry, without a cut either (a second
    # within 20 steps would cut).
    assert [e.step for e in safe.events if e.kind == "lr_cut"] == []
    (rollback,) = [e for e in safe.events if e.kind == "rollback"]
    assert (
        rollback.cause is Cause.NONFINITE_FOUND_LATE
        or rollback.cause is Cause.UPDATE_WROTE_NONFINITE
    )
    assert (rollback.labels["scope"], rollback.data["params"]) == ("entries", 1.0)
    assert math.isfinite(demo.reference_loss)


@pytest.mark.parametrize(
    "safe_options",
    [
        pytest.param({}, id="defaults"),
        pytest.param({"clip": 1.0}, id="clip=1.0"),
    ],
)
def test_demo_safe_loss_close_to_fault_free_run(
    demo: DemoResult, clean_safe_loss: float, safe_options: dict[str, Any]
) -> None:
    result = demo if not safe_options else run_demo(steps=STEPS, seed=0, safe_options=safe_options)
    safe_loss = result.method("SafeOptimizer").held_out_loss
    assert math.isfinite(safe_loss)
    assert safe_loss <= SANE_FACTOR * clean_safe_loss, (
        f"{safe_loss:.4g} vs fault-free {clean_safe_loss:.4g}"
    )


def test_demo_reports_divergence_instead_of_raising() -> None:
    result = run_demo(steps=60, seed=0, safe_options={"max_consecutive_failures": 1})
    safe = result.method("SafeOptimizer")
    (nan_grad_step,) = result.schedule.steps_of("nan_grad")
    assert safe.error is not None and "consecutive" in safe.error
    assert len(safe.losses) == nan_grad_step  # the run stopped at the step that raised
    assert safe.is_finite  # the weights are the last good ones
    assert "raised DivergenceError" in format_report(result)


def test_demo_is_deterministic_for_a_seed() -> None:
    first, second = run_demo(steps=20, seed=3), run_demo(steps=20, seed=3)
    for a, b in zip(first.methods, second.methods):
        assert a.losses == pytest.approx(b.losses, nan_ok=True)


def test_demo_schedule_spreads_one_fault_of_each_demo_kind() -> None:
    schedule = demo_schedule(300)
    assert dict(schedule) == {
        60: "nan_grad",
        105: "inf_loss",
        150: "grad_spike",
        255: "nan_weights",
    }
    with pytest.raises(ValueError, match="steps"):
        demo_schedule(5)


def test_format_report_has_a_row_per_method_and_the_events(demo: DemoResult) -> None:
    text = format_report(demo)
    lines = text.splitlines()
    assert any(line.startswith("AdamW") and " nan " in line for line in lines)
    assert any(line.startswith("SafeOptimizer") and "never" in line for line in lines)
    safe = demo.method("SafeOptimizer")
    listed = [line.split()[:3] for line in lines if line.lstrip().startswith("step ")]
    # every event and every clipped step, once each, in step order
    assert len(listed) == len(safe.events) + len(safe.clips)
    # the clipped steps: ordinary ones (listed from the verdicts), and outliers (the spike
    # clip and the emergency clip: events of their own)
    clip_events = [e for e in safe.events if e.kind in ("clip", "emergency_clip")]
    assert len(safe.clips) + len({e.step for e in clip_events}) == safe.stats["total_clips"]
    assert [int(step) for _, step, _ in listed] == sorted(e.step for e in safe.events + safe.clips)
    assert sorted(int(step) for _, step, kind in listed if kind == "clip") == sorted(
        [e.step for e in safe.clips] + [e.step for e in safe.events if e.kind == "clip"]
    )


def test_cli_demo_runs_as_a_module() -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "stableopt", "demo", "--steps", "60"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "broken (NaN loss) since" in proc.stdout
    assert "AdamW" in proc.stdout and "SafeOptimizer" in proc.stdout and "rollback" in proc.stdout
    assert "skip:" not in proc.stderr  # the library's warnings stay off the console by default


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--steps", "5"])
    assert exc.value.code == 2
    assert "--steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([])


# -- each fault kind ------------------------------------------------------------------------

OPTIMIZERS: dict[str, Callable[[Any], Optimizer]] = {
    "AdamW": lambda params: torch.optim.AdamW(params, lr=1e-2, foreach=True),
    "AdamW-fused": lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True),
    "SGD-forloop": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, foreach=False),
}
WRAPPERS: dict[str, Callable[[Optimizer], Optimizer]] = {
    "plain": lambda opt: opt,
    "safe": SafeOptimizer,
}
FAULT_STEP = 3
TASK = RegressionTask(seed=1, batch_size=16)


def _setup(optimizer: str = "AdamW", wrapper: str = "plain") -> tuple[nn.Module, Optimizer]:
    model = TASK.make_model()
    return model, WRAPPERS[wrapper](OPTIMIZERS[optimizer](model.parameters()))


def _run_step(
    model: nn.Module, opt: Optimizer, injector: FaultInjector | None, step: int
) -> tuple[float, list[torch.Tensor]]:
    """One training step; return its loss and the gradients the optimizer saw."""
    x, y = TASK.batch(step)
    if injector is not None:
        injector.begin_step(step)
        x, y = injector.corrupt_batch(x, y)
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    if injector is not None:
        injector.corrupt_grads(model.parameters())
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    opt.step()
    return float(loss.detach()), grads


def _all_finite(tensors: Any) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def test_nan_grad_hits_exactly_the_scheduled_step() -> None:
    model, opt = _setup()
    schedule = FaultSchedule({FAULT_STEP: "nan_grad"}, nan_fraction=0.1)
    with FaultInjector(schedule, opt) as injector:
        for step in range(1, 6):  # no update: the weights stay finite, only the fault is seen
            injector.begin_step(step)
            x, y = injector.corrupt_batch(*TASK.batch(step))
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            injector.corrupt_grads(model.parameters())
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            assert _all_finite(grads) == (step != FAULT_STEP), step
            if step == FAULT_STEP:
                nan_share = sum(int(g.isnan().sum()) for g in grads) / sum(g.numel() for g in grads)
                assert 0.03 < nan_share < 0.3  # about nan_fraction of the entries
    assert injector.injected == [(FAULT_STEP, "nan_grad")]


def test_grad_spike_multiplies_every_gradient() -> None:
    model, opt = _setup()
    reference, _ = _setup()
    schedule = FaultSchedule({1: "grad_spike"}, spike_factor=1e5)
    with FaultInjector(schedule, opt) as injector:
        _, spiked = _run_step(model, opt, injector, 1)
    _, clean = _run_step(reference, torch.optim.SGD(reference.parameters(), lr=0.0), None, 1)
    for g_spiked, g_clean in zip(spiked, clean):
        torch.testing.assert_close(g_spiked, g_clean * 1e5)


def test_inf_loss_gives_an_inf_loss_and_non_finite_grads() -> None:
    model, opt = _setup()
    with FaultInjector(FaultSchedule({2: "inf_loss"}), opt) as injector:
        results = [_run_step(model, opt, injector, step) for step in (1, 2)]
    assert math.isfinite(results[0][0]) and _all_finite(results[0][1])
    assert math.isinf(results[1][0]) and not _all_finite(results[1][1])


def test_poison_batch_scales_the_targets_on_a_copy() -> None:
    _, opt = _setup()
    x, y = TASK.batch(1)
    y_before = y.clone()
    injector = FaultInjector(FaultSchedule({1: "poison_batch"}, poison_scale=1e4), opt)
    injector.begin_step(1)
    x_out, y_out = injector.corrupt_batch(x, y)
    assert x_out is x and torch.equal(y_out, y_before * 1e4) and torch.equal(y, y_before)
    injector.begin_step(2)
    assert injector.corrupt_batch(x, y)[1] is y
    injector.close()


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_nan_weights_breaks_a_plain_optimizer(optimizer: str) -> None:
    model, opt = _setup(optimizer, "plain")
    with FaultInjector(FaultSchedule({FAULT_STEP: "nan_weights"}), opt) as injector:
        for step in range(1, FAULT_STEP + 1):
            _, grads = _run_step(model, opt, injector, step)
            assert _all_finite(grads)  # the gradients were fine: the update broke the weights
            assert _all_finite(model.parameters()) == (step < FAULT_STEP)
    assert injector.injected == [(FAULT_STEP, "nan_weights")]


@pytest.mark.parametrize("check_weights", ["every_step", "lazy"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_nan_weights_is_rolled_back_by_safe_optimizer(optimizer: str, check_weights: str) -> None:
    model = TASK.make_model()
    opt = SafeOptimizer(OPTIMIZERS[optimizer](model.parameters()), check_weights=check_weights)  # type: ignore[arg-type]
    with FaultInjector(FaultSchedule({FAULT_STEP: "nan_weights"}), opt) as injector:
        for step in range(1, FAULT_STEP + 3):
            _run_step(model, opt, injector, step)
            # lazy: the corruption is found (and undone) at the next step
            expected = check_weights == "every_step" or step != FAULT_STEP
            assert _all_finite(model.parameters()) == expected, step
    assert injector.injected == [(FAULT_STEP, "nan_weights")]
    assert opt.stats()["rollbacks"] == 1
    assert [e.kind for e in opt.events() if e.kind in ("skip", "rollback")] == ["rollback"]


def test_injector_treats_plain_and_safe_alike() -> None:
    plain_model, plain = _setup("AdamW", "plain")
    safe_model, safe = _setup("AdamW", "safe")
    assert inner_optimizer(plain) is plain and inner_optimizer(safe) is safe.optimizer  # type: ignore[attr-defined]
    schedule = FaultSchedule({2: "nan_grad", 4: "grad_spike"})
    runs = [
        run_training(m, o, TASK, 5, schedule) for m, o in ((plain_model, plain), (safe_model, safe))
    ]
    assert runs[0].injected == runs[1].injected == [(2, "nan_grad"), (4, "grad_spike")]
    # same data and same faults: the same losses up to the first fault
    assert runs[0].losses[:2] == runs[1].losses[:2]


def test_close_removes_the_weight_hook() -> None:
    model, opt = _setup()
    injector = FaultInjector(FaultSchedule({1: "nan_weights"}), opt)
    injector.close()
    _run_step(model, opt, None, 1)
    injector.begin_step(1)
    opt.step()
    assert _all_finite(model.parameters())


# -- schedules and the task -------------------------------------------------------------------


def test_random_schedule_is_deterministic_for_a_seed() -> None:
    rates = {"nan_grad": 0.05, "grad_spike": 0.05, "nan_weights": 0.02}
    first = FaultSchedule.random(1000, rates, seed=7)
    assert dict(first) == dict(FaultSchedule.random(1000, rates, seed=7))
    assert dict(first) == dict(FaultSchedule.random(1000, dict(reversed(rates.items())), seed=7))
    assert dict(first) != dict(FaultSchedule.random(1000, rates, seed=8))
    assert set(first.faults.values()) == set(rates)
    assert all(1 <= step <= 1000 for step in first.faults)
    assert 30 < len(first.steps_of("nan_grad")) < 75  # about 5% of 1000


def test_random_schedule_rates() -> None:
    assert dict(FaultSchedule.random(10, {"inf_loss": 1.0})) == dict.fromkeys(
        range(1, 11), "inf_loss"
    )
    assert len(FaultSchedule.random(10, {})) == 0
    with pytest.raises(ValueError, match="sum to at most 1"):
        FaultSchedule.random(10, {"nan_grad": 0.6, "inf_loss": 0.6})
    with pytest.raises(ValueError, match="nan_grad"):
        FaultSchedule.random(10, {"nan_gradient": 0.1})
    with pytest.raises(ValueError, match=r"rates\['nan_grad'\]"):
        FaultSchedule.random(10, {"nan_grad": -0.1})


def test_schedule_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="one of"):
        FaultSchedule({1: "bit_flip"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="fault step"):
        FaultSchedule({0: "nan_grad"})
    with pytest.raises(ValueError, match="spike_factor"):
        FaultSchedule(spike_factor=-1.0)
    schedule = FaultSchedule({5: "nan_grad", 2: "grad_spike"})
    assert list(schedule) == [(2, "grad_spike"), (5, "nan_grad")]
    assert schedule.describe() == "step 2 grad_spike (x100000), step 5 nan_grad"
    with pytest.raises(TypeError):
        schedule.faults[3] = "nan_grad"  # type: ignore[index]
    assert set(FAULT_KINDS) == {
        "nan_grad",
        "inf_loss",
        "grad_spike",
        "nan_weights",
        "poison_batch",
        "nan_batch",
    }


def test_task_and_model_depend_on_the_seed_only() -> None:
    rng_state = torch.get_rng_state()
    a, b = make_mlp(seed=4), make_mlp(seed=4)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG is untouched
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(next(make_mlp(seed=5).parameters()), next(a.parameters()))
    task = RegressionTask(seed=2)
    assert all(torch.equal(u, v) for u, v in zip(task.batch(7), RegressionTask(seed=2).batch(7)))
    assert not torch.equal(task.batch(7)[0], task.batch(8)[0])
    assert not torch.equal(task.held_out(16)[0], task.batch(1)[0][:16])

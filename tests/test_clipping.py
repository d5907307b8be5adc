"""Adaptive clip policies, each against an independent reference.

ZScoreClip against the authors' ``zclip`` package, PercentileClip against
``numpy.percentile``, AGCClip against the NFNets formula written out here.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from stableopt import SafeOptimizer
from stableopt.registry import resolve_clip
from stableopt.stages import AGCClip, ClipPolicy, FixedClip, PercentileClip, StepNumbers, ZScoreClip
from stableopt.stages.clip import clip_coefficient


def spiky_norms(steps: int, seed: int = 0) -> list[float]:
    """Positive norms around 1 with a slow drift and spikes of 10x to 1000x (some in warm-up)."""
    rng = np.random.default_rng(seed)
    norms = 1.0 + 0.3 * np.linspace(0, 1, steps) + 0.1 * np.abs(rng.standard_normal(steps))
    for step, factor in {
        10: 100.0,
        40: 10.0,
        80: 100.0,
        81: 1000.0,
        150: 50.0,
        220: 1000.0,
    }.items():
        if step < steps:
            norms[step] *= factor
    return [float(n) for n in norms]


def run(policy: ClipPolicy, norms: list[float], dtype: torch.dtype = torch.float32) -> list[float]:
    """Drive ``policy`` as the pipeline does; return each step's threshold.

    Both ways of the one formula, with the same numbers: the norm as a float (the host
    decides) and as a 0-dim ``dtype`` tensor (a fused optimizer on an accelerator). They
    agree to an ulp or two in float64 (torch's lerp may fuse a multiply-add), and to
    float32 rounding in float32.
    """
    thresholds = []
    for norm in norms:
        grad_norm = torch.tensor(norm, dtype=dtype)
        on_host = policy.max_norm(float(grad_norm))
        on_device = policy.max_norm(grad_norm)
        assert isinstance(on_host, float)
        if math.isinf(on_host):
            assert float(on_device) == on_host
        elif dtype == torch.float64:
            assert float(on_device) == pytest.approx(on_host, rel=1e-15)
        else:
            assert float(on_device) == pytest.approx(on_host, rel=1e-6)
        thresholds.append(on_host)
        policy.observe(StepNumbers(float(grad_norm), is_accepted=math.isfinite(norm)))
    return thresholds


# -- ZScoreClip vs the zclip package -------------------------------------------------------


class _OneParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, dtype=torch.float64))


@pytest.mark.parametrize(
    ("dtype", "rtol", "kwargs"),
    [
        (torch.float64, 1e-12, {}),
        (torch.float32, 1e-5, {}),
        (
            torch.float64,
            1e-12,
            {"clip_factor": 0.7, "z_thresh": 2.0, "alpha": 0.9, "max_norm": 3.0},
        ),
        (torch.float64, 1e-12, {"warmup_steps": 1, "max_norm": 1.0}),
    ],
)
def test_zscore_matches_zclip(dtype: torch.dtype, rtol: float, kwargs: dict[str, Any]) -> None:
    zclip = pytest.importorskip("zclip")
    reference_kwargs = {k: v for k, v in kwargs.items() if k != "max_norm"}
    reference = zclip.ZClip(max_grad_norm=kwargs.get("max_norm"), **reference_kwargs)
    policy = ZScoreClip(eps=1e-6, rewarm_after=None, **kwargs)  # zclip's eps, no re-warm-up
    model = _OneParameter()
    n_clipped = 0
    for step, norm in enumerate(spiky_norms(300)):
        # A one-element float64 gradient: zclip's total norm is exactly ``norm``.
        model.weight.grad = torch.tensor([norm], dtype=torch.float64)
        grad_norm = torch.tensor(norm, dtype=dtype)
        (threshold,) = run(policy, [norm], dtype)  # both ways; observes the step too
        reference.step(model)
        clipped_reference = float(model.weight.grad[0])
        clipped_ours = float(grad_norm * clip_coefficient(threshold, grad_norm))
        assert clipped_ours == pytest.approx(clipped_reference, rel=rtol), step
        is_reference_clipped = clipped_reference < norm
        n_clipped += is_reference_clipped
        if is_reference_clipped:
            assert threshold == pytest.approx(clipped_reference, rel=1e-5), step
        elif "max_norm" not in kwargs:
            assert math.isinf(threshold), step
        if reference.initialized:
            state = policy.state_dict()
            assert float(state["mean"]) == pytest.approx(reference.mean, rel=rtol), step
            assert float(state["var"]) == pytest.approx(reference.var, rel=10 * rtol), step
    assert n_clipped >= 4  # the spikes after warm-up were clipped: the comparison is not vacuous


def test_a_norm_that_moves_for_good_is_rewarmed_not_capped_forever() -> None:
    """The norm moves from about 100 to about 300 after the warm-up and stays there: zclip
    (the package, and rewarm_after=None) locks in, clipping every later step to its old
    level (it feeds its EMA the clipped norm); the default warms up again after 16 clipped
    steps in a row and then follows the norm."""
    zclip = pytest.importorskip("zclip")
    rng = np.random.default_rng(3)
    norms = [float(n) for n in rng.uniform(70, 130, 40)] + [
        float(n) for n in rng.uniform(250, 350, 400)
    ]
    reference = zclip.ZClip()
    model = _OneParameter()
    locked = 0
    for norm in norms:
        model.weight.grad = torch.tensor([norm], dtype=torch.float64)
        reference.step(model)
        locked += float(model.weight.grad[0]) < norm * (1 - 1e-9)
    late = norms[200:]
    zclip_like = run(ZScoreClip(rewarm_after=None), norms)[200:]
    ours = run(ZScoreClip(), norms)[200:]
    assert locked > 0.9 * len(norms) - 40  # every step after the move
    assert sum(t < n for t, n in zip(zclip_like, late)) == len(late)
    assert sum(t < n for t, n in zip(ours, late)) < 0.1 * len(late)


def test_zscore_warmup_is_unclipped_and_capped() -> None:
    norms = spiky_norms(30)
    thresholds = run(ZScoreClip(warmup_steps=25), norms)
    assert all(math.isinf(float(t)) for t in thresholds[:25])  # includes the 100x spike at step 10
    capped = run(ZScoreClip(warmup_steps=25, max_norm=2.0), norms)
    assert all(float(t) == 2.0 for t in capped[:25])


def test_zscore_min_norm_floors_a_spike_threshold() -> None:
    norms = [1.0, 1.1, 0.9, 1.0, 1000.0]
    free = run(ZScoreClip(warmup_steps=4), norms)[-1]
    floored = run(ZScoreClip(warmup_steps=4, min_norm=50.0), norms)[-1]
    assert float(free) < 50.0
    assert float(floored) == 50.0


# -- PercentileClip vs numpy.percentile ----------------------------------------------------


@pytest.mark.parametrize("percentile", [0.0, 10.0, 37.5, 50.0, 95.0, 100.0])
@pytest.mark.parametrize("window_steps", [1, 7, 1000])
def test_percentile_matches_numpy_across_the_ring_buffer_wrap(
    percentile: float, window_steps: int
) -> None:
    norms = spiky_norms(40, seed=1)
    thresholds = run(PercentileClip(percentile, window_steps), norms, torch.float64)
    for step, threshold in enumerate(thresholds):
        history = norms[max(0, step + 1 - window_steps) : step + 1]  # this step's norm included
        expected = np.percentile(history, percentile)
        assert float(threshold) == pytest.approx(expected, rel=1e-12, abs=0), step


def test_percentile_float32_matches_numpy() -> None:
    norms = [float(np.float32(n)) for n in spiky_norms(60, seed=2)]
    thresholds = run(PercentileClip(), norms)
    for step, threshold in enumerate(thresholds):
        assert float(threshold) == pytest.approx(np.percentile(norms[: step + 1], 10), rel=1e-6)


def test_percentile_is_bounded() -> None:
    norms = spiky_norms(40, seed=3)
    thresholds = run(PercentileClip(50.0, 8, min_norm=1.2, max_norm=1.3), norms, torch.float64)
    for step, threshold in enumerate(thresholds):
        expected = np.clip(np.percentile(norms[max(0, step - 7) : step + 1], 50), 1.2, 1.3)
        assert float(threshold) == pytest.approx(expected, rel=1e-12)


# -- AGCClip vs the NFNets formula ----------------------------------------------------


def agc_reference(param: Tensor, grad: Tensor, clip_factor: float, eps: float) -> Tensor:
    """Brock et al. 2021, eq. 3, with the unit norm over every dim but the output one."""
    dims = tuple(range(1, param.ndim)) if param.ndim > 1 else tuple(range(param.ndim))
    keepdim = param.ndim > 1
    weight_norm = torch.linalg.vector_norm(param, dim=dims, keepdim=keepdim).clamp(min=eps)
    grad_norm = torch.linalg.vector_norm(grad, dim=dims, keepdim=keepdim)
    ratio = grad_norm / weight_norm
    scaled = grad * (clip_factor * weight_norm / grad_norm.clamp(min=1e-6))
    return torch.where(ratio > clip_factor, scaled, grad)


def agc_params() -> list[Tensor]:
    """Optimizer order of a small conv net: conv, two same-shape linears, a gain, the head."""
    torch.manual_seed(0)
    shapes = [(4, 3, 3, 3), (4,), (16, 16), (16,), (16, 16), (16,), (), (5, 16), (5,)]
    params: list[Tensor] = [nn.Parameter(torch.randn(shape)) for shape in shapes]
    params[1].data.zero_()  # a zero bias: its limit comes from eps
    for p in params:
        # Half the units far over their limit, half under it.
        p.grad = torch.randn(p.shape) * torch.where(torch.rand(p.shape) < 0.5, 10.0, 1e-4)
    params[6].grad = torch.tensor(50.0)  # the gain is one unit: make sure it is over
    return params


@pytest.mark.parametrize(
    ("exclude", "excluded"),
    [("final_layer", {7, 8}), (None, set()), ("explicit", {0, 3})],
)
def test_agc_matches_formula_and_skips_excluded(exclude: Any, excluded: set[int]) -> None:
    params = agc_params()
    if exclude == "explicit":
        exclude = [params[0], params[3]]
    grads = [p.grad for p in params if p.grad is not None]
    grads_before = [g.clone() for g in grads]
    policy = AGCClip(clip_factor=0.05, eps=1e-3, exclude=exclude)
    assert math.isinf(policy.max_norm(1.0))  # no total-norm limit
    assert bool(policy.clip_in_place(grads, params))
    for i, (p, grad, before) in enumerate(zip(params, grads, grads_before)):
        assert p.grad is grad  # clipped in place
        if i in excluded:
            assert torch.equal(grad, before), i
        else:
            expected = agc_reference(p.detach(), before, 0.05, 1e-3)
            torch.testing.assert_close(grad, expected, rtol=1e-6, atol=0)
            assert not torch.equal(grad, before), i  # some unit of every tensor was clipped


def test_agc_leaves_small_grads_alone() -> None:
    params = agc_params()
    grads = [torch.full(p.shape, 1e-9) for p in params]
    for p, grad in zip(params, grads):
        p.grad = grad
    assert not bool(AGCClip(exclude=None).clip_in_place(grads, params))
    assert all(torch.equal(grad, torch.full(grad.shape, 1e-9)) for grad in grads)


# -- a skipped step never enters the history ----------------------------------------------


def _policies() -> list[Callable[[], ClipPolicy]]:
    return [
        lambda: ZScoreClip(warmup_steps=3),
        lambda: ZScoreClip(warmup_steps=3, max_norm=5.0, min_norm=0.5),
        lambda: PercentileClip(25.0, window_steps=5),
    ]


@settings(max_examples=30, deadline=None)
@given(
    norms=st.lists(st.floats(0.01, 1e4), min_size=1, max_size=25),
    bad=st.lists(
        st.tuples(st.integers(0, 25), st.sampled_from([math.nan, math.inf, 1e30, 1.0])),
        max_size=5,
    ),
    which=st.integers(0, 2),
)
def test_a_skipped_step_never_changes_the_history(
    norms: list[float], bad: list[tuple[int, float]], which: int
) -> None:
    make = _policies()[which]
    clean, noisy = make(), make()
    skips = dict(bad)
    for step, norm in enumerate(norms):
        if step in skips:
            before = noisy.state_dict()
            noisy.max_norm(torch.tensor(skips[step]))
            noisy.max_norm(skips[step])
            noisy.observe(StepNumbers(skips[step], is_accepted=False))
            after = noisy.state_dict()
            # Exact, with NaN == NaN (the percentile ring buffer's empty slots).
            torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)
        assert run(noisy, [norm]) == run(clean, [norm])


# -- checkpoints ----------------------------------------------------------------------------


@pytest.mark.parametrize("make", _policies())
def test_state_dict_round_trip_is_bit_identical(make: Callable[[], ClipPolicy]) -> None:
    norms = spiky_norms(60, seed=4)
    uninterrupted = run(make(), norms)
    first = make()
    resumed = run(first, norms[:23])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # plain tensors only
    assert all(isinstance(v, (Tensor, int, float)) for v in state.values())
    second = make()
    second.load_state_dict(state)
    resumed += run(second, norms[23:])
    assert uninterrupted == resumed


def test_state_dict_from_other_settings_is_rejected() -> None:
    state = PercentileClip(window_steps=10).state_dict()
    with pytest.raises(ValueError, match="norms"):
        PercentileClip(window_steps=20).load_state_dict(state)
    with pytest.raises(ValueError, match="keys"):
        ZScoreClip().load_state_dict(state)


# -- no host sync in the hot path -----------------------------------------------------------


def test_device_decisions_and_observe_never_read_the_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    params = agc_params()
    grads = [p.grad for p in params if p.grad is not None]
    policies: list[ClipPolicy] = [
        ZScoreClip(warmup_steps=2, max_norm=9.0),
        PercentileClip(window_steps=3),
        AGCClip(),
    ]

    def sync(*args: object) -> None:
        raise AssertionError("host sync in the clip policy")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    for policy in policies:
        for norm in [1.0, 1.2, 0.9, 100.0, math.nan]:
            policy.max_norm(torch.tensor(norm))
            if getattr(policy, "clips_in_place", False):
                policy.clip_in_place(grads, params)  # type: ignore[attr-defined]
            # the pipeline hands observe() the host numbers of its one read
            policy.observe(StepNumbers(norm, is_accepted=math.isfinite(norm)))


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "argument"),
    [
        (lambda: resolve_clip("autoclip"), "clip"),
        (lambda: PercentileClip(percentile=-1.0), "percentile"),
        (lambda: PercentileClip(percentile=100.5), "percentile"),
        (lambda: PercentileClip(window_steps=0), "window_steps"),
        (lambda: PercentileClip(window_steps=2**24 + 1), "window_steps"),
        (lambda: PercentileClip(min_norm=2.0, max_norm=1.0), "min_norm"),
        (lambda: PercentileClip(min_norm=-1.0), "min_norm"),
        (lambda: PercentileClip(max_norm=0.0), "max_norm"),
        (lambda: ZScoreClip(min_norm=3.0, max_norm=1.0), "min_norm"),
        (lambda: ZScoreClip(alpha=0.0), "alpha"),
        (lambda: ZScoreClip(alpha=1.5), "alpha"),
        (lambda: ZScoreClip(z_thresh=-2.5), "z_thresh"),
        (lambda: ZScoreClip(warmup_steps=0), "warmup_steps"),
        (lambda: ZScoreClip(clip_factor=-1.0), "clip_factor"),
        (lambda: ZScoreClip(eps=0.0), "eps"),
        (lambda: ZScoreClip(max_norm=math.nan), "max_norm"),
        (lambda: AGCClip(clip_factor=-0.01), "clip_factor"),
        (lambda: AGCClip(eps=-1e-3), "eps"),
        (lambda: AGCClip(exclude="head"), "exclude"),  # type: ignore[arg-type]
    ],
)
def test_bad_values_raise_value_error_naming_the_argument(
    build: Callable[[], object], argument: str
) -> None:
    with pytest.raises(ValueError, match=argument):
        build()


@pytest.mark.parametrize(
    ("build", "argument"),
    [
        (lambda: resolve_clip([1.0]), "clip"),  # type: ignore[arg-type]
        (lambda: PercentileClip(percentile="10"), "percentile"),  # type: ignore[arg-type]
        (lambda: PercentileClip(window_steps=10.0), "window_steps"),  # type: ignore[arg-type]
        (lambda: ZScoreClip(warmup_steps=True), "warmup_steps"),
        (lambda: ZScoreClip(max_norm="1"), "max_norm"),  # type: ignore[arg-type]
        (lambda: AGCClip(clip_factor=None), "clip_factor"),  # type: ignore[arg-type]
        (lambda: AGCClip(exclude=3), "exclude"),  # type: ignore[arg-type]
        (lambda: AGCClip(exclude=[torch.zeros(1), "bias"]), "exclude"),  # type: ignore[list-item]
    ],
)
def test_bad_types_raise_type_error_naming_the_argument(
    build: Callable[[], object], argument: str
) -> None:
    with pytest.raises(TypeError, match=argument):
        build()


def test_names_resolve_to_policies() -> None:
    assert isinstance(resolve_clip("zscore"), ZScoreClip)
    assert isinstance(resolve_clip("percentile"), PercentileClip)
    assert isinstance(resolve_clip("agc"), AGCClip)
    assert isinstance(resolve_clip(1.0), FixedClip)
    assert float(clip_coefficient(1.0, torch.tensor(4.0))) == pytest.approx(0.25, rel=1e-6)


# -- end to end through SafeOptimizer ---------------------------------------------------------


def _train(
    clip: str, steps: int, fused: bool, spike_at: int = -1
) -> tuple[SafeOptimizer, list[Any]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    inner = torch.optim.SGD(model.parameters(), lr=0.05, fused=fused or None)
    opt = SafeOptimizer(inner, clip=clip)
    records = []
    for step in range(steps):
        x = torch.randn(32, 8)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), x[:, :1].sin())
        (loss * (100.0 if step == spike_at else 1.0)).backward()
        opt.step()
        stats = opt.stats()
        assert isinstance(stats["clip_threshold"], float)
        records.append(stats)
    return opt, records


@pytest.mark.usefixtures("decide_on")
@pytest.mark.parametrize("fused", [False, True])
def test_end_to_end_percentile(fused: bool) -> None:
    opt, records = _train("percentile", 50, fused)
    norms = [r["grad_norm"] for r in records]
    for step, record in enumerate(records):
        expected = np.percentile(norms[: step + 1], 10)
        assert record["clip_threshold"] == pytest.approx(expected, rel=1e-6)
    assert records[-1]["total_clips"] > 25  # the 10th percentile clips most steps


@pytest.mark.usefixtures("decide_on")
@pytest.mark.parametrize("fused", [False, True])
def test_end_to_end_zscore(fused: bool) -> None:
    opt, records = _train("zscore", 50, fused, spike_at=40)
    # warming up, ZClip clips nothing: the threshold is the spike guard's bound (from its
    # 3rd value on: 100x the median norm) or the emergency one (10x the median, from the
    # 8th), far above every ordinary norm
    assert all(math.isinf(r["clip_threshold"]) for r in records[:2])
    assert all(r["clip_threshold"] > 2 * r["grad_norm"] for r in records[2:25])
    spike = records[40]
    assert spike["clip_threshold"] < spike["grad_norm"] / 10
    # Whether another stage skipped the spike or it was clipped, the history holds
    # exactly the accepted steps.
    assert isinstance(opt.clip, ZScoreClip)
    assert opt.clip.state_dict()["count"] == records[-1]["good_steps"]


@pytest.mark.usefixtures("decide_on")
def test_end_to_end_agc() -> None:
    opt, records = _train("agc", 50, fused=False)
    # AGC rescales units in place; the total-norm threshold is the spike guard's or the
    # emergency one only
    assert all(math.isinf(r["clip_threshold"]) for r in records[:2])
    assert all(r["clip_threshold"] > 2 * r["grad_norm"] for r in records[2:])
    assert records[-1]["total_clips"] > 0
    assert records[-1]["good_steps"] == 50

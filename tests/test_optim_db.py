"""Any torch optimizer means all of them: every optimizer and every input of torch's own
optimizer test database (``optim_db``), in float32, float64 and complex64 where the optimizer
supports complex parameters, with sparse gradients where it supports them, in its for-loop,
foreach and fused forms.

For each: healthy steps (under an LR scheduler) are bit-identical to the bare optimizer with
``clip=None``; a step with a NaN loss is skipped with weights and state bit-identical; a
state-dict resume continues exactly as the uninterrupted run. Where bare torch itself refuses
a combination, the case is skipped with torch's reason.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

from stableopt import SafeOptimizer

common_optimizers = pytest.importorskip(
    "torch.testing._internal.common_optimizers", reason="torch's optim_db needs expecttest"
)

STEPS, NAN_STEP, SAVE_AT = 6, 4, 3


def _cases() -> Iterator[Any]:
    for info in common_optimizers.optim_db:
        name = info.optim_cls.__name__
        impls: list[str] = ["forloop"] + [
            i for i in ("foreach", "fused") if i in info.supported_impls
        ]
        if info.only_supports_sparse_grads:
            layouts = ["sparse"]
        else:
            layouts = ["dense"] + (["sparse"] if info.supports_sparse else [])
        dtypes = [torch.float32, torch.float64] + (
            [torch.complex64] if info.supports_complex else []
        )
        for optim_input in info.optim_inputs_func(device="cpu"):
            for impl in impls:
                for layout in layouts:
                    for dtype in dtypes:
                        if layout == "sparse" and dtype.is_complex:
                            continue
                        yield pytest.param(
                            info.optim_cls,
                            dict(optim_input.kwargs),
                            impl,
                            layout,
                            dtype,
                            id=f"{name}-{optim_input.desc}-{impl}-{layout}-{str(dtype)[6:]}",
                        )


CASES = list(_cases())


@pytest.fixture(autouse=True)
def quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="stableopt")


class Problem:
    """A tiny least-squares problem whose closure gives every optimizer real gradients."""

    def __init__(self, dtype: torch.dtype, layout: str, matrices_only: bool = False) -> None:
        g = torch.Generator().manual_seed(0)
        real = torch.float64 if dtype == torch.float64 else torch.float32
        self.layout = layout
        if layout == "sparse":
            self.params = [torch.randn(10, 3, generator=g, dtype=real).requires_grad_()]
        else:
            self.params = [
                torch.randn(4, 3, generator=g, dtype=real).to(dtype).requires_grad_(),
                torch.randn(4, generator=g, dtype=real).to(dtype).requires_grad_(),
            ]
            if matrices_only:  # Muon takes 2-D parameters only
                self.params = self.params[:1]
        self.x = torch.randn(3, 8, generator=g, dtype=real).to(dtype)
        self.y = torch.randn(4, 8, generator=g, dtype=real).to(dtype)

    def twin(self) -> Problem:
        other = copy.deepcopy(self)
        for p, q in zip(other.params, self.params):
            with torch.no_grad():
                p.copy_(q)
        return other

    def closure(self, optimizer: Any, step: int, nan: bool = False) -> Callable[[], Tensor]:
        def closure() -> Tensor:
            optimizer.zero_grad()
            if self.layout == "sparse":
                rows = torch.tensor([step % 10, (3 * step) % 10, (7 * step + 1) % 10])
                loss = (
                    torch.nn.functional.embedding(rows, self.params[0], sparse=True).square().sum()
                )
            else:
                w = self.params[0]
                out = w @ self.x + (self.params[1][:, None] if len(self.params) > 1 else 0)
                loss = (out - self.y).abs().square().mean()
            if nan:
                loss = loss * math.nan
            loss.backward()
            return loss.detach()

        return closure


def build(cls: type, kwargs: dict[str, Any], impl: str, params: list[Tensor]) -> Any:
    impl_kwargs = {
        "forloop": {"foreach": False},
        "foreach": {"foreach": True},
        "fused": {"fused": True},
    }
    options = dict(kwargs)
    if "foreach" in options or "fused" in options:  # the input chooses its implementation
        if impl != "forloop":
            pytest.skip("the input sets its own implementation")
    elif cls is not torch.optim.LBFGS and cls.__name__ not in ("SparseAdam", "Muon"):
        options |= impl_kwargs[impl]
    return cls(params, **options)


def run_step(optimizer: Any, problem: Problem, step: int, nan: bool = False) -> None:
    closure = problem.closure(optimizer, step, nan)
    if isinstance(optimizer, SafeOptimizer) or isinstance(optimizer, torch.optim.LBFGS):
        optimizer.step(closure)
    else:
        closure()
        optimizer.step()


def snapshot(optimizer: Any, params: list[Tensor]) -> tuple[list[Tensor], list[dict[str, Any]]]:
    state = []
    for p in params:
        entry = {}
        for key, value in optimizer.state.get(p, {}).items():
            entry[key] = value.clone() if isinstance(value, Tensor) else copy.deepcopy(value)
        state.append(entry)
    return [p.detach().clone() for p in params], state


def same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        if not isinstance(b, Tensor) or a.dtype != b.dtype or a.layout != b.layout:
            return False
        if a.layout != torch.strided:  # sparse state (SGD's momentum on sparse gradients)
            return torch.equal(a.to_dense(), b.to_dense())
        return torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def bare_or_skip(cls: type, kwargs: dict[str, Any], impl: str, problem: Problem) -> Any:
    """The bare optimizer, stepped once on a copy: where torch refuses, skip with its reason."""
    trial = problem.twin()
    try:
        optimizer = build(cls, kwargs, impl, trial.params)
        run_step(optimizer, trial, 1)
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as error:
        pytest.skip(f"torch refuses it: {str(error).splitlines()[0][:200]}")
    return optimizer


@pytest.mark.parametrize(("cls", "kwargs", "impl", "layout", "dtype"), CASES)
def test_every_optimizer_and_input_of_optim_db(
    cls: type, kwargs: dict[str, Any], impl: str, layout: str, dtype: torch.dtype
) -> None:
    problem = Problem(dtype, layout, matrices_only=cls.__name__ == "Muon")
    bare_or_skip(cls, kwargs, impl, problem)

    # healthy steps, under a scheduler: bit for bit the bare optimizer
    bare_problem, safe_problem = problem.twin(), problem.twin()
    bare = build(cls, kwargs, impl, bare_problem.params)
    safe = SafeOptimizer(build(cls, kwargs, impl, safe_problem.params), clip=None)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (bare, safe)]
    for step in range(1, STEPS + 1):
        if step == NAN_STEP:  # a NaN loss: skipped, nothing changes (the bare one skips too)
            before = snapshot(safe, safe_problem.params)
            run_step(safe, safe_problem, step, nan=True)
            assert same(before, snapshot(safe, safe_problem.params)), "a skipped step changed state"
        else:
            run_step(bare, bare_problem, step)
            run_step(safe, safe_problem, step)
        for scheduler in schedulers:
            scheduler.step()
        assert same(snapshot(bare, bare_problem.params), snapshot(safe, safe_problem.params)), step
        assert bare.param_groups[0]["lr"] == safe.param_groups[0]["lr"]
        assert all(torch.isfinite(p).all() for p in safe_problem.params)
    stats = safe.stats()
    assert stats["skipped_steps"] == 1 and stats["rollbacks"] == 0, safe.events()

    # a state-dict resume continues exactly as bare torch's own resume does (which casts the
    # loaded state to the parameters' dtype: ASGD's eta and mu come back as float64)
    def resumed(wrap: bool) -> tuple[Any, Problem]:
        def make(params: list[Tensor]) -> Any:
            inner = build(cls, kwargs, impl, params)
            return SafeOptimizer(inner, clip=None) if wrap else inner

        first = problem.twin()
        optimizer = make(first.params)
        for step in range(1, SAVE_AT + 1):
            run_step(optimizer, first, step)
        saved = copy.deepcopy(optimizer.state_dict())
        second = first.twin()
        optimizer = make(second.params)
        optimizer.load_state_dict(saved)
        for step in range(SAVE_AT + 1, STEPS + 1):
            run_step(optimizer, second, step)
        return optimizer, second

    (bare_resumed, bare_problem), (safe_resumed, safe_problem) = resumed(False), resumed(True)
    assert same(
        snapshot(bare_resumed, bare_problem.params), snapshot(safe_resumed, safe_problem.params)
    )
    assert safe_resumed.stats()["steps"] == STEPS


LBFGS_CASES = [case for case in CASES if case.values[0] is torch.optim.LBFGS]


@pytest.mark.parametrize(("cls", "kwargs", "impl", "layout", "dtype"), LBFGS_CASES)
def test_lbfgs_under_the_defaults_is_the_bare_lbfgs(
    cls: type, kwargs: dict[str, Any], impl: str, layout: str, dtype: torch.dtype
) -> None:
    """A line search over full-batch gradients whose norm falls toward convergence: nothing
    of it is an outlier, so the defaults (no clip, no spike guard for LBFGS) step as bare
    LBFGS does, bit for bit, and count no intervention."""
    problem = Problem(dtype, layout)
    bare_problem, safe_problem = problem.twin(), problem.twin()
    bare = build(cls, kwargs, impl, bare_problem.params)
    safe = SafeOptimizer(build(cls, kwargs, impl, safe_problem.params))
    for step in range(1, 61):  # to convergence: the norm falls by orders of magnitude
        run_step(bare, bare_problem, step)
        run_step(safe, safe_problem, step)
        assert same(snapshot(bare, bare_problem.params), snapshot(safe, safe_problem.params)), step
    stats = safe.stats()
    counted = ("skipped_steps", "total_clips", "emergency_clips", "rollbacks", "lr_changes")
    assert {key: stats[key] for key in counted} == dict.fromkeys(counted, 0), safe.events()

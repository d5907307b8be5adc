"""SafeLoss and ConsistencyLoss against references: the bare loss, trimming and masking by hand."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stableopt import SafeOptimizer
from stableopt.loss import ConsistencyLoss, SafeLoss
from stableopt.outcomes import EventKind
from tests.helpers import OPTIMIZERS, OptimizerInfo, make_model, same_snapshot, snapshot


def leaf(*shape: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_()


def labels(*shape: int, classes: int, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, shape, generator=g)


def value_and_grad(fn: Callable[[Tensor], Tensor], pred: Tensor) -> tuple[Tensor, Tensor]:
    """fn(pred) and d fn / d pred, on a fresh copy of ``pred``."""
    x = pred.detach().clone().requires_grad_()
    value = fn(x)
    value.backward()
    assert x.grad is not None
    return value.detach(), x.grad


def assert_same(
    got: tuple[Tensor, Tensor], expected: tuple[Tensor, Tensor], exact: bool = True
) -> None:
    for a, b in zip(got, expected):
        if exact:
            assert torch.equal(a, b), (a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def power_loss(p: Tensor, t: Tensor) -> Tensor:
    return (p - t).abs().pow(1.5).sum()


def masked_mean(
    elementwise: Callable[[Tensor, Tensor], Tensor], pred: Tensor, target: Tensor, lengths: Tensor
) -> Tensor:
    """The mean of ``elementwise`` over the first ``lengths[b]`` steps (time last) of each item.

    Written out item by item, slicing away the padding: no mask tensor.
    """
    total, count = pred.new_zeros(()), 0
    for b, n in enumerate(lengths.tolist()):
        values = elementwise(pred[b, ..., :n], target[b, ..., :n])
        total, count = total + values.sum(), count + values.numel()
    return total / max(count, 1)


def squared(p: Tensor, t: Tensor) -> Tensor:
    return (p - t) ** 2


# -- transparency: the bare loss's value and gradient -------------------------------------

BARE_CASES: list[tuple[str, Callable[..., Tensor], Callable[[], Tensor], dict[str, Any]]] = [
    ("MSELoss", nn.MSELoss(), lambda: torch.randn(4, 3), {}),
    ("L1Loss", nn.L1Loss(), lambda: torch.randn(4, 3), {}),
    ("SmoothL1Loss-sum", nn.SmoothL1Loss(reduction="sum"), lambda: torch.randn(4, 3), {}),
    (
        "CrossEntropyLoss-module",
        nn.CrossEntropyLoss(ignore_index=2, label_smoothing=0.1),
        lambda: labels(4, 7, classes=5),
        {},
    ),
    (
        "F.cross_entropy-kwargs",
        F.cross_entropy,
        lambda: labels(4, 7, classes=5),
        {"ignore_index": 1},
    ),
    ("plain-function", power_loss, lambda: torch.randn(4, 3), {}),
]


@pytest.mark.parametrize(
    ("name", "loss", "make_target", "kwargs"),
    BARE_CASES,
    ids=lambda c: c if isinstance(c, str) else "",
)
def test_value_and_grad_are_the_bare_loss(
    name: str,
    loss: Callable[..., Tensor],
    make_target: Callable[[], Tensor],
    kwargs: dict[str, Any],
) -> None:
    target = make_target()
    pred = leaf(4, 5, 7) if name.lower().find("cross") >= 0 else leaf(4, 3)
    safe = SafeLoss(loss)
    assert_same(
        value_and_grad(lambda x: safe(x, target, **kwargs), pred),
        value_and_grad(lambda x: loss(x, target, **kwargs), pred),
    )
    assert safe.stats() == {"nonfinite_losses": 0, "size_mismatches": 0, "expected_mismatches": 0}


# -- non-finite losses ------------------------------------------------------------------------


def nan_loss(pred: Tensor, target: Tensor) -> Tensor:
    """A NaN value whose gradient is the (finite) MSE gradient."""
    return F.mse_loss(pred, target) + torch.tensor(float("nan"))


@pytest.mark.parametrize("info", OPTIMIZERS, ids=repr)
def test_nonfinite_loss_skips_the_next_step_even_with_finite_grads(info: OptimizerInfo) -> None:
    model = make_model()
    opt = SafeOptimizer(info.build(model.parameters()))
    good, bad = SafeLoss(nn.MSELoss(), optimizer=opt), SafeLoss(nan_loss, optimizer=opt)
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    for step in range(3):
        opt.zero_grad()
        loss_fn = bad if step == 1 else good
        loss = loss_fn(model(x), y)
        loss.backward()  # does not raise on NaN
        before = snapshot(model, opt)
        opt.step()
        if step == 1:
            assert math.isnan(loss.item())
            assert all(
                torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None
            )
            assert same_snapshot(before, snapshot(model, opt)), "a NaN-loss step changed the model"
        else:
            assert not same_snapshot(before, snapshot(model, opt))
    stats = opt.stats()
    assert stats["skipped_steps"] == 1 and stats["nonfinite_losses"] == 1
    assert bad.stats() == {"nonfinite_losses": 1, "size_mismatches": 0, "expected_mismatches": 0}
    assert good.stats()["nonfinite_losses"] == 0
    kinds = [(e.step, e.kind) for e in opt.events()]
    assert (2, "skip") in kinds and (2, "nonfinite_loss") in kinds
    assert bad.events()[0].kind == EventKind.NONFINITE_LOSS
    assert bad.events()[0].data["nonfinite_losses"] == 1


def test_standalone_counts_nonfinite_losses_lazily() -> None:
    safe = SafeLoss(lambda p, t: (p - t).sum() / (p - t).sum().detach() * float("inf"))
    for _ in range(5):
        safe(torch.randn(3), torch.randn(3))
    safe(torch.ones(3), torch.zeros(3).fill_(float("nan")))
    assert safe.stats()["nonfinite_losses"] == 6
    assert [e.data["nonfinite_losses"] for e in safe.events()] == [6.0]  # one read, one event
    assert all(e.step == 0 for e in safe.events())


def test_evaluation_losses_are_counted_but_not_observed() -> None:
    model = make_model()
    opt = SafeOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    safe = SafeLoss(nan_loss, optimizer=opt)
    with torch.no_grad():
        safe(model(torch.randn(4, 8)), torch.randn(4, 1))
    F.mse_loss(model(torch.randn(4, 8)), torch.randn(4, 1)).backward()
    opt.step()  # a training step after an evaluation NaN is not skipped
    stats = opt.stats()
    assert stats["skipped_steps"] == 0 and stats["nonfinite_losses"] == 1


# -- consistency loss -------------------------------------------------------------------------


def test_consistency_loss_is_weighted_mse_against_a_detached_target() -> None:
    a, b = leaf(2, 4, 30), leaf(2, 4, 27, seed=5)
    value = ConsistencyLoss(weight=0.3)(a, b)
    value.backward()
    a_ref = a.detach().clone().requires_grad_()
    expected = 0.3 * F.mse_loss(a_ref[..., :27], b.detach()[..., :27])
    expected.backward()
    assert torch.equal(value.detach(), expected.detach())
    assert a.grad is not None and torch.equal(a.grad, a_ref.grad)  # type: ignore[arg-type]
    assert b.grad is None  # no gradient into the second decoder


def test_consistency_loss_masks_like_safe_loss() -> None:
    a, b = leaf(3, 4, 12), leaf(3, 4, 12, seed=2)
    lengths = torch.tensor([12, 3, 8])
    got = ConsistencyLoss(weight=2.0)(a, b, lengths=lengths)
    torch.testing.assert_close(got, 2.0 * masked_mean(squared, a, b.detach(), lengths))


# -- integration ------------------------------------------------------------------------------


def test_num_items_in_batch_is_dropped_or_forwarded() -> None:
    pred, target = torch.randn(4, 3), torch.randn(4, 3)
    assert torch.equal(
        SafeLoss(nn.MSELoss())(pred, target, num_items_in_batch=4), F.mse_loss(pred, target)
    )

    def hf_style(outputs: Tensor, labels: Tensor, num_items_in_batch: int | None = None) -> Tensor:
        return F.mse_loss(outputs, labels, reduction="sum") / num_items_in_batch  # type: ignore[operator]

    def any_kwargs(outputs: Tensor, labels: Tensor, **kwargs: Any) -> Tensor:
        return F.mse_loss(outputs, labels, reduction="sum") / kwargs["num_items_in_batch"]

    for fn in (hf_style, any_kwargs):
        got = SafeLoss(fn)(pred, target, num_items_in_batch=12)
        assert torch.equal(got, F.mse_loss(pred, target, reduction="sum") / 12)


def test_counters_in_opt_stats_and_loss_stats() -> None:
    model = make_model()
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    safe = SafeLoss(nn.MSELoss(), optimizer=opt)
    assert opt.stats()["nonfinite_losses"] == 0 and opt.stats()["size_mismatches"] == 0
    x = torch.randn(6, 8)
    for step in range(4):
        opt.zero_grad()
        pred = model(x).expand(6, 5)  # (B, T=5) against 4 target frames
        target = torch.full((6, 4), float("nan")) if step == 2 else torch.randn(6, 4)
        safe(pred, target).backward()
        opt.step()
    assert safe.stats() == {"nonfinite_losses": 1, "size_mismatches": 4, "expected_mismatches": 0}
    stats = opt.stats()
    assert (stats["nonfinite_losses"], stats["size_mismatches"], stats["skipped_steps"]) == (
        1,
        4,
        1,
    )


# -- torch.compile ------------------------------------------------------------------------------


def graph_breaks(fn: Callable[..., Tensor], *args: Tensor) -> tuple[int, int]:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args)
    return explained.graph_count, explained.graph_break_count


def test_compile_adds_no_graph_break_on_the_happy_path() -> None:
    model = make_model()
    opt = SafeOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    bare = nn.MSELoss()
    safe = SafeLoss(nn.MSELoss(), optimizer=opt)
    x, y = torch.randn(8, 8), torch.randn(8, 1)
    seq_pred, seq_target, lengths = (
        torch.randn(2, 3, 10),
        torch.randn(2, 3, 10),
        torch.tensor([10, 6]),
    )

    assert graph_breaks(lambda a, b: bare(model(a), b), x, y) == (1, 0)
    assert graph_breaks(lambda a, b: safe(model(a), b), x, y) == (1, 0)
    assert graph_breaks(lambda a, b, n: safe(a, b, lengths=n), seq_pred, seq_target, lengths) == (
        1,
        0,
    )

    # a real compiled run: same values as eager, NaN still counted and still skips
    torch._dynamo.reset()
    step_fn = torch.compile(lambda a, b: safe(model(a), b), backend="eager")
    eager = bare(model(x), y)
    compiled = step_fn(x, y)
    assert torch.equal(compiled, eager)
    compiled.backward()
    opt.step()
    opt.zero_grad()
    step_fn(x, torch.full_like(y, float("nan"))).backward()
    opt.step()
    assert opt.stats()["nonfinite_losses"] == 1 and opt.stats()["skipped_steps"] == 1
    torch._dynamo.reset()


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: SafeLoss(3), TypeError, "loss must be a loss callable"),  # type: ignore[arg-type]
        (lambda: SafeLoss(nn.MSELoss), TypeError, "the class MSELoss"),  # type: ignore[arg-type]
        (
            lambda: SafeLoss(
                nn.MSELoss(),
                optimizer=torch.optim.SGD([nn.Parameter(torch.ones(1))]),  # type: ignore[arg-type]
            ),
            TypeError,
            "optimizer must be a stableopt.SafeOptimizer",
        ),
        (
            lambda: SafeLoss(nn.MSELoss(), on_mismatch="pad"),
            ValueError,
            r"on_mismatch must be one of \['trim', 'expected', 'error', 'ignore'\]",
        ),
        (lambda: SafeLoss(nn.MSELoss(), time_dim=True), TypeError, "time_dim must be an int"),
        (lambda: SafeLoss(nn.MSELoss(), elementwise=1), TypeError, "elementwise must be a bool"),  # type: ignore[arg-type]
        (lambda: ConsistencyLoss(weight=-0.5), ValueError, "weight must be >= 0"),
        (lambda: ConsistencyLoss(weight="1"), TypeError, "weight must be a number"),  # type: ignore[arg-type]
    ],
)
def test_bad_arguments_name_the_argument(
    make: Callable[[], Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        make()

"""SafeLoss's layouts: untouched where the loss takes the shapes, trimmed and masked like by hand.

References are the plain loss call on untouched or hand-sliced tensors, and losses
written out item by item; a shape SafeLoss cannot place must raise with the fix.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stableopt import SafeOptimizer
from stableopt.loss import SafeLoss
from tests.helpers import make_model
from tests.test_loss import (
    assert_same,
    labels,
    leaf,
    masked_mean,
    power_loss,
    squared,
    value_and_grad,
)


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# -- untouched: what the wrapped loss accepts goes through as it is ------------------------


@pytest.mark.parametrize("vocab", [50, 10], ids=["V>T", "V<T"])
@pytest.mark.parametrize("time_dim", [None, 1, -1])
def test_lm_loss_on_b_t_v_logits_is_the_plain_call(vocab: int, time_dim: int | None) -> None:
    logits, targets = leaf(4, 16, vocab), labels(4, 16, classes=vocab)
    safe = SafeLoss(lm_loss, time_dim=time_dim)
    assert_same(
        value_and_grad(lambda x: safe(x, targets), logits),
        value_and_grad(lambda x: lm_loss(x, targets), logits),
    )
    assert safe.stats()["size_mismatches"] == 0


@pytest.mark.parametrize(
    ("loss", "make"),
    [
        (nn.CrossEntropyLoss(), lambda: (leaf(4, 7, 16), labels(4, 16, classes=7))),  # (B, V, T)
        (nn.CrossEntropyLoss(), lambda: (leaf(4, 7), labels(4, classes=7))),  # (N, C)
        (nn.CrossEntropyLoss(), lambda: (leaf(7), labels(classes=7))),  # unbatched (C,)
        (nn.CrossEntropyLoss(), lambda: (leaf(4, 7, 16), torch.rand(4, 7, 16).softmax(1))),
        (nn.NLLLoss(), lambda: (leaf(4, 7, 3, 5).log_softmax(1), labels(4, 3, 5, classes=7))),
        (nn.BCEWithLogitsLoss(), lambda: (leaf(4, 16), torch.rand(4, 16).round())),  # gates
        (nn.MSELoss(), lambda: (leaf(4, 80, 16), torch.randn(4, 80, 16))),  # (B, n_mel, T)
        (power_loss, lambda: (leaf(4, 3), torch.randn(4, 3))),
    ],
    ids=["ce-BVT", "ce-NC", "ce-C", "ce-probs", "nll-2d", "bce-gate", "mse-mel", "fn"],
)
def test_accepted_layouts_are_untouched(
    loss: Callable[..., Tensor], make: Callable[[], tuple[Tensor, Tensor]]
) -> None:
    pred, target = make()
    pred = pred.detach()
    safe = SafeLoss(loss)
    assert_same(
        value_and_grad(lambda x: safe(x, target), pred),
        value_and_grad(lambda x: loss(x, target), pred),
    )
    assert safe.stats()["size_mismatches"] == 0


def test_a_callable_gets_any_rank_difference_untouched() -> None:
    ctc = nn.CTCLoss()  # (T, B, C) against (B, S): a layout SafeLoss does not know
    log_probs = leaf(20, 2, 5).log_softmax(-1)
    targets = labels(2, 6, classes=4) + 1
    args = (log_probs, targets, torch.tensor([20, 18]), torch.tensor([6, 4]))
    assert torch.equal(SafeLoss(ctc)(*args), ctc(*args))


# -- trimmed: the time dim of a known layout, or the one named by time_dim --------------------


@pytest.mark.parametrize("frames", [19, 13], ids=["decoder-longer", "decoder-shorter"])
@pytest.mark.parametrize(
    "loss", [nn.MSELoss(), nn.L1Loss(), nn.SmoothL1Loss(), nn.HuberLoss(), F.l1_loss]
)
def test_mel_outputs_of_another_length_are_trimmed_like_by_hand(
    frames: int, loss: Callable[..., Tensor]
) -> None:
    pred, target = leaf(3, 8, frames), torch.randn(3, 8, 16)  # (B, n_mel, T)
    steps = min(frames, 16)
    safe = SafeLoss(loss)
    assert_same(
        value_and_grad(lambda x: safe(x, target), pred),
        value_and_grad(lambda x: loss(x[:, :, :steps], target[:, :, :steps]), pred),
    )
    assert safe.stats()["size_mismatches"] == 1


@pytest.mark.parametrize("loss", [nn.BCEWithLogitsLoss(), nn.BCELoss()], ids=["logits", "probs"])
def test_bce_gate_outputs_are_trimmed_like_by_hand(loss: nn.Module) -> None:
    squash = torch.sigmoid if isinstance(loss, nn.BCELoss) else (lambda x: x)
    gate, stop = leaf(3, 21), torch.rand(3, 18).round()  # (B, T): a stop token per frame
    safe = SafeLoss(loss)
    assert_same(
        value_and_grad(lambda x: safe(squash(x), stop), gate),
        value_and_grad(lambda x: loss(squash(x)[:, :18], stop), gate),
    )


@pytest.mark.parametrize("frames", [19, 13])
@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(label_smoothing=0.1), F.cross_entropy])
def test_class_index_targets_are_trimmed_in_time_never_in_classes(
    frames: int, loss: Callable[..., Tensor]
) -> None:
    logits, target = leaf(3, 7, frames), labels(3, 16, classes=7)  # (B, V, T) against (B, T)
    steps = min(frames, 16)
    assert_same(
        value_and_grad(lambda x: SafeLoss(loss)(x, target), logits),
        value_and_grad(lambda x: loss(x[..., :steps], target[:, :steps]), logits),
    )


def test_probability_targets_are_trimmed_in_time() -> None:
    logits, target = leaf(3, 7, 19), torch.rand(3, 7, 16).softmax(1)
    assert_same(
        value_and_grad(lambda x: SafeLoss(nn.CrossEntropyLoss())(x, target), logits),
        value_and_grad(lambda x: F.cross_entropy(x[..., :16], target), logits),
    )


@pytest.mark.parametrize("time_dim", [1, -2])
@pytest.mark.parametrize("loss", [nn.MSELoss(), power_loss], ids=["mse", "fn"])
def test_time_dim_names_the_trimmed_dim(time_dim: int, loss: Callable[..., Tensor]) -> None:
    pred, target = leaf(3, 19, 4), torch.randn(3, 16, 4)  # (B, T, C)
    safe = SafeLoss(loss, time_dim=time_dim)
    assert_same(
        value_and_grad(lambda x: safe(x, target), pred),
        value_and_grad(lambda x: loss(x[:, :16], target), pred),
    )
    assert safe.stats()["size_mismatches"] == 1


def test_trims_are_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    safe = SafeLoss(nn.CrossEntropyLoss())
    with caplog.at_level("WARNING", logger="stableopt"):
        safe(torch.randn(2, 5, 12), labels(2, 10, classes=5))
    assert safe.stats()["size_mismatches"] == 1
    assert (
        "(2, 5, 12)" in caplog.text and "(2, 10)" in caplog.text and "trimmed to 10" in caplog.text
    )
    assert [e.kind for e in safe.events()] == ["size_mismatch"]


def test_mismatch_warnings_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    model = make_model()
    opt = SafeOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    for safe in (SafeLoss(nn.MSELoss()), SafeLoss(nn.MSELoss(), optimizer=opt)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="stableopt"):
            for _ in range(1000):
                safe(torch.zeros(2, 3, 10), torch.zeros(2, 3, 9))
        assert safe.stats()["size_mismatches"] == 1000
        assert 1 <= len(caplog.records) <= 11, len(caplog.records)  # 1, 2, 4, ..., 512
        assert "(2, 3, 10)" in caplog.records[0].getMessage()
        assert len(safe.events()) == 10
    assert opt.stats()["size_mismatches"] == 1000


# -- every shape SafeLoss cannot place: ValueError with both shapes and the fix ---------------


def raises_naming(
    safe: SafeLoss, pred: Tensor, target: Tensor, *fragments: str, **kwargs: Any
) -> None:
    with pytest.raises(ValueError) as info:
        safe(pred, target, **kwargs)
    message = str(info.value)
    for fragment in (str(tuple(pred.shape)), str(tuple(target.shape)), *fragments):
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("vocab", [50, 10], ids=["V>T", "V<T"])
def test_b_t_v_logits_for_a_class_index_loss_raise(vocab: int) -> None:
    logits, targets = torch.randn(4, 16, vocab), labels(4, 16, classes=vocab)
    for loss in (nn.CrossEntropyLoss(), F.cross_entropy, nn.NLLLoss()):
        raises_naming(SafeLoss(loss), logits, targets, "movedim(-1, 1)", "time_dim=-1")


def test_explicit_time_dim_resolves_a_class_count_equal_to_the_target_length() -> None:
    logits, target = leaf(2, 10, 12), labels(2, 10, classes=10)  # (B, C=10, T=12) vs (B, 10)
    raises_naming(SafeLoss(nn.CrossEntropyLoss()), logits, target, "time_dim=-1")
    assert_same(
        value_and_grad(lambda x: SafeLoss(nn.CrossEntropyLoss(), time_dim=-1)(x, target), logits),
        value_and_grad(lambda x: F.cross_entropy(x[..., :10], target), logits),
    )


@pytest.mark.parametrize("loss", [power_loss, nn.PoissonNLLLoss()], ids=["fn", "unknown-module"])
def test_a_callable_with_a_same_rank_mismatch_raises_with_the_time_dim_fix(
    loss: Callable[..., Tensor],
) -> None:
    raises_naming(
        SafeLoss(loss), torch.rand(3, 8, 19), torch.rand(3, 8, 16), "does not know", "time_dim=2"
    )


def test_an_overridden_forward_is_not_a_known_layout() -> None:
    class TimeFirstMSE(nn.MSELoss):
        def forward(self, pred: Tensor, target: Tensor) -> Tensor:
            return F.mse_loss(pred.transpose(0, 1), target.transpose(0, 1))

    raises_naming(SafeLoss(TimeFirstMSE()), torch.randn(3, 4), torch.randn(3, 5), "time_dim=1")

    class LoggedMSE(nn.MSELoss):  # forward kept: still element-wise
        pass

    assert SafeLoss(LoggedMSE())(torch.zeros(3, 5), torch.ones(3, 4)).item() == 1.0


@pytest.mark.parametrize(
    ("loss", "pred_shape", "target_shape", "fragment"),
    [
        (nn.MSELoss(), (3, 8, 16), (4, 8, 16), "batch sizes"),
        (nn.MSELoss(), (3, 9, 16), (3, 8, 16), "not in the time dim"),
        (nn.MSELoss(), (3, 9, 16), (3, 8, 15), "2 dims"),
        (nn.MSELoss(), (3, 16, 1), (3, 16), "ranks 3 and 2"),
        (nn.BCEWithLogitsLoss(), (3, 16), (3, 16, 1), "ranks 2 and 3"),
        (nn.CrossEntropyLoss(), (3, 7, 16), (3, 6, 16), "class dim 1"),
        (nn.CrossEntropyLoss(), (3, 7, 4, 16), (3, 5, 16), "not in the time dim"),
        (nn.CrossEntropyLoss(), (3, 7), (4,), "batch sizes"),
        (nn.CrossEntropyLoss(), (3, 7, 16), (3,), "ranks 3 and 1"),
    ],
)
def test_other_differences_raise(
    loss: nn.Module, pred_shape: tuple[int, ...], target_shape: tuple[int, ...], fragment: str
) -> None:
    target = torch.rand(*target_shape)
    if isinstance(loss, nn.CrossEntropyLoss) and len(target_shape) < len(pred_shape):
        target = labels(*target_shape, classes=pred_shape[1])
    raises_naming(SafeLoss(loss), torch.randn(*pred_shape), target, fragment)


def test_time_dim_refuses_a_mismatch_elsewhere_and_names_the_fix() -> None:
    raises_naming(
        SafeLoss(nn.MSELoss(), time_dim=1),
        torch.randn(2, 3, 9),
        torch.randn(2, 3, 8),
        "not in the time dim (time_dim=1)",
        "time_dim=2 (or -1)",
    )


def test_error_mode_refuses_a_trim() -> None:
    raises_naming(
        SafeLoss(nn.MSELoss(), on_mismatch="error"),
        torch.randn(2, 3, 9),
        torch.randn(2, 3, 8),
        "on_mismatch='error'",
    )


def test_ignore_mode_passes_broadcasting_through() -> None:
    def per_sequence(p: Tensor, t: Tensor) -> Tensor:  # (B, T) against one target per row
        return ((p - t) ** 2).mean()

    pred, target = torch.randn(3, 16), torch.randn(3, 1)
    raises_naming(SafeLoss(per_sequence), pred, target, "on_mismatch='ignore'")
    assert torch.equal(
        SafeLoss(per_sequence, on_mismatch="ignore")(pred, target), per_sequence(pred, target)
    )


@pytest.mark.parametrize(
    ("loss", "time_dim", "shape", "match"),
    [
        (nn.MSELoss(), 0, (2, 4), "time_dim=0 is the batch dim"),
        (nn.MSELoss(), -2, (2, 4), "time_dim=-2 is the batch dim"),
        (nn.MSELoss(), 3, (2, 4, 5), r"time_dim=3 is out of range.*\(2, 4, 5\)"),
        (nn.CrossEntropyLoss(), 1, (2, 4, 5), "time_dim=1 is the class dim"),
        (nn.CrossEntropyLoss(), -2, (2, 4, 5), "time_dim=-2 is the class dim"),
    ],
)
def test_a_time_dim_that_cannot_be_time_raises(
    loss: nn.Module, time_dim: int, shape: tuple[int, ...], match: str
) -> None:
    pred = torch.randn(*shape)
    target = labels(2, 5, classes=4) if isinstance(loss, nn.CrossEntropyLoss) else pred.clone()
    with pytest.raises(ValueError, match=match):
        SafeLoss(loss, time_dim=time_dim)(pred, target)


# -- masking: the mean over valid positions only -----------------------------------------------


@pytest.mark.parametrize("frames", [19, 16, 13], ids=["longer", "equal", "shorter"])
@pytest.mark.parametrize(
    ("loss", "elementwise"),
    [(nn.MSELoss(), squared), (nn.L1Loss(), lambda p, t: (p - t).abs()), (F.mse_loss, squared)],
    ids=["mse", "l1", "F.mse_loss"],
)
def test_masked_mel_loss_is_the_mean_over_valid_frames(
    frames: int, loss: Callable[..., Tensor], elementwise: Callable[[Tensor, Tensor], Tensor]
) -> None:
    pred, target = leaf(3, 8, frames), torch.randn(3, 8, 16)
    lengths = torch.tensor([16, 5, 11])
    steps = min(frames, 16)
    target[1, :, 5:] = float("nan")  # padding garbage reaches neither the value nor the grad
    clean = target.nan_to_num()[..., :steps]
    assert_same(
        value_and_grad(lambda x: SafeLoss(loss)(x, target, lengths=lengths), pred),
        value_and_grad(lambda x: masked_mean(elementwise, x[..., :steps], clean, lengths), pred),
        exact=False,
    )


@pytest.mark.parametrize("time_dim", [1, -2])
def test_masked_b_t_c_with_time_dim(time_dim: int) -> None:
    pred, target = leaf(3, 11, 4), torch.randn(3, 11, 4)
    lengths = torch.tensor([11, 4, 7])
    assert_same(
        value_and_grad(
            lambda x: SafeLoss(nn.MSELoss(), time_dim=time_dim)(x, target, lengths=lengths), pred
        ),
        value_and_grad(
            lambda x: masked_mean(squared, x.movedim(1, -1), target.movedim(1, -1), lengths), pred
        ),
        exact=False,
    )


def test_masked_bce_gate_loss() -> None:
    gate, stop = leaf(3, 14), torch.rand(3, 12).round()
    lengths = torch.tensor([12, 3, 8])

    def bce(x: Tensor, y: Tensor) -> Tensor:
        return -(y * F.logsigmoid(x) + (1 - y) * F.logsigmoid(-x))

    assert_same(
        value_and_grad(lambda x: SafeLoss(nn.BCEWithLogitsLoss())(x, stop, lengths=lengths), gate),
        value_and_grad(lambda x: masked_mean(bce, x[:, :12], stop, lengths), gate),
        exact=False,
    )


def weighted_nll_by_hand(
    logits: Tensor, target: Tensor, lengths: Tensor, weight: Tensor, ignore_index: int
) -> Tensor:
    """sum w[y] * -log p(y) over valid, non-ignored positions, over the sum of their w[y]."""
    total, denominator = logits.new_zeros(()), logits.new_zeros(())
    for b, n in enumerate(lengths.tolist()):
        for t in range(n):
            y = int(target[b, t])
            if y == ignore_index:
                continue
            total = total - weight[y] * logits[b, :, t].log_softmax(0)[y]
            denominator = denominator + weight[y]
    return total / denominator


@pytest.mark.parametrize("frames", [9, 12], ids=["equal", "longer"])
@pytest.mark.parametrize("functional", [False, True], ids=["module", "F.cross_entropy"])
def test_masked_cross_entropy_with_ignore_index_and_class_weights(
    frames: int, functional: bool
) -> None:
    weight = torch.tensor([0.5, 1.0, 2.0, 0.25, 1.5])
    logits, target = leaf(3, 5, frames), labels(3, 9, classes=5)
    target[0, 1] = target[2, 0] = 3  # ignored inside the valid positions too
    target[1, 2:] = 99  # padding: an out-of-range label must not be looked up
    lengths = torch.tensor([9, 2, 5])
    if functional:
        safe = SafeLoss(F.cross_entropy)
        kwargs: dict[str, Any] = {"weight": weight, "ignore_index": 3}
    else:
        safe, kwargs = SafeLoss(nn.CrossEntropyLoss(weight=weight, ignore_index=3)), {}
    assert_same(
        value_and_grad(lambda x: safe(x, target, lengths=lengths, **kwargs), logits),
        value_and_grad(lambda x: weighted_nll_by_hand(x, target, lengths, weight, 3), logits),
        exact=False,
    )


def test_the_class_weight_twin_shares_the_weights() -> None:
    weight = torch.tensor([0.5, 1.0, 2.0])
    safe = SafeLoss(nn.CrossEntropyLoss(weight=weight)).double()
    assert set(safe.state_dict()) == {"loss.weight"}
    logits, target = torch.randn(2, 3, 6, dtype=torch.float64), labels(2, 6, classes=3)
    lengths = torch.tensor([6, 2])
    assert safe(logits, target, lengths=lengths).dtype == torch.float64


def test_a_callable_masks_with_an_explicit_time_dim() -> None:
    def focal(logits: Tensor, target: Tensor) -> Tensor:  # unreduced: (B, C, T), (B, T) -> (B, T)
        logp = logits.log_softmax(1).gather(1, target.unsqueeze(1)).squeeze(1)
        return -((1 - logp.exp()) ** 2) * logp

    logits, target = leaf(3, 5, 9), labels(3, 9, classes=5)
    lengths = torch.tensor([9, 2, 5])
    with pytest.raises(ValueError, match="pass time_dim="):
        SafeLoss(focal, elementwise=True)(logits, target, lengths=lengths)
    safe = SafeLoss(focal, elementwise=True, time_dim=-1)

    def by_hand(x: Tensor) -> Tensor:
        total = x.new_zeros(())
        for b, n in enumerate(lengths.tolist()):
            total = total + focal(x[b : b + 1, :, :n], target[b : b + 1, :n]).sum()
        return total / lengths.sum()

    assert_same(
        value_and_grad(lambda x: safe(x, target, lengths=lengths), logits),
        value_and_grad(by_hand, logits),
        exact=False,
    )
    with pytest.raises(ValueError, match=r"dim 2 of the prediction.*dim 1 of the target differ"):
        safe(leaf(3, 5, 12), target, lengths=lengths)  # never trimmed without a known layout


def test_padding_garbage_in_the_prediction_reaches_no_gradient() -> None:
    frames = leaf(2, 3, 5)
    past_stop = torch.full((2, 3, 4), float("nan"))  # a decoder's output after its stop token
    target = torch.randn(2, 3, 9)
    lengths = torch.tensor([5, 2])
    loss = SafeLoss(nn.MSELoss())(torch.cat([frames, past_stop], dim=-1), target, lengths=lengths)
    loss.backward()
    expected = value_and_grad(lambda x: masked_mean(squared, x, target[..., :5], lengths), frames)
    assert_same((loss.detach(), frames.grad), expected, exact=False)  # type: ignore[arg-type]


def test_an_elementwise_callable_trims_and_masks_with_time_dim() -> None:
    pred, target = leaf(3, 5, 13), torch.randn(3, 5, 11)
    lengths = torch.tensor([11, 6, 9])
    with pytest.raises(ValueError, match=r"\(3, 5, 13\).*\(3, 5, 11\).*time_dim=2"):
        SafeLoss(squared, elementwise=True)(pred, target, lengths=lengths)
    safe = SafeLoss(squared, elementwise=True, time_dim=-1)
    assert_same(
        value_and_grad(lambda x: safe(x, target, lengths=lengths), pred),
        value_and_grad(lambda x: masked_mean(squared, x[..., :11], target, lengths), pred),
        exact=False,
    )
    assert safe.stats() == {"nonfinite_losses": 0, "size_mismatches": 1, "expected_mismatches": 0}


def test_masked_sum_and_none_reductions() -> None:
    pred, target = leaf(2, 3, 6), torch.randn(2, 3, 6)
    lengths = torch.tensor([2, 5])
    l1 = (pred - target).abs()
    summed = SafeLoss(nn.L1Loss(reduction="sum"))(pred, target, lengths=lengths)
    torch.testing.assert_close(summed, l1[0, :, :2].sum() + l1[1, :, :5].sum())
    unreduced = SafeLoss(nn.L1Loss(reduction="none"))(pred, target, lengths=lengths)
    expected = torch.zeros_like(l1)
    expected[0, :, :2], expected[1, :, :5] = l1[0, :, :2], l1[1, :, :5]
    torch.testing.assert_close(unreduced, expected)


@pytest.mark.parametrize("loss", [nn.MSELoss(), nn.CrossEntropyLoss()], ids=["mse", "ce"])
def test_an_all_masked_batch_gives_zero_and_zero_grads(loss: nn.Module) -> None:
    pred = leaf(2, 4, 6)
    is_ce = isinstance(loss, nn.CrossEntropyLoss)
    target = labels(2, 6, classes=4) if is_ce else torch.randn(2, 4, 6)
    value, grad = value_and_grad(
        lambda x: SafeLoss(loss)(x, target, lengths=torch.zeros(2, dtype=torch.long)), pred
    )
    assert value.item() == 0.0 and math.copysign(1, value.item()) == 1
    assert torch.isfinite(grad).all() and torch.equal(grad, torch.zeros_like(grad))


def test_a_loss_with_its_own_lengths_gets_them_untouched() -> None:
    def own_masking(p: Tensor, t: Tensor, lengths: Tensor) -> Tensor:
        return sum(F.mse_loss(p[b, :n], t[b, :n], reduction="sum") for b, n in enumerate(lengths))

    pred, target = leaf(2, 7), torch.randn(2, 7)
    lengths = torch.tensor([3, 9])  # its own meaning: SafeLoss neither checks nor masks them
    assert_same(
        value_and_grad(lambda x: SafeLoss(own_masking)(x, target, lengths=lengths), pred),
        value_and_grad(lambda x: own_masking(x, target, lengths), pred),
    )


# -- lengths are checked ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lengths", "error", "match"),
    [
        ([3, 2], TypeError, "got list"),
        (torch.tensor([3.0, 2.0]), TypeError, "got dtype torch.float32"),
        (torch.tensor([True, False]), TypeError, "got dtype torch.bool"),
        (torch.tensor([[3, 2]]), ValueError, r"shape \(2,\).*got shape \(1, 2\)"),
        (torch.tensor([3, 2, 1]), ValueError, r"got shape \(3,\)"),
        (torch.tensor([3, -1]), ValueError, "between 0 and 4.*got values from -1 to 3"),
        (torch.tensor([5, 2]), ValueError, "between 0 and 4.*got values from 2 to 5"),
    ],
)
def test_bad_lengths_are_rejected(lengths: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=f"lengths must be.*{match}"):
        SafeLoss(nn.MSELoss())(torch.randn(2, 3, 4), torch.randn(2, 3, 4), lengths=lengths)


def test_lengths_past_the_time_dim_name_its_size() -> None:
    pred, target = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    with pytest.raises(ValueError, match=r"between 0 and 4, the length of the time dim -1.*10"):
        SafeLoss(nn.MSELoss())(pred, target, lengths=torch.tensor([10, 6, 3]))
    # the bound is the longer of the two: target lengths fit a decoder that stopped early
    value = SafeLoss(nn.MSELoss())(
        torch.zeros(3, 5, 3), torch.ones(3, 5, 4), lengths=torch.tensor([4, 2, 0])
    )
    assert value.item() == 1.0


def test_lengths_are_checked_on_the_device_under_compile() -> None:
    safe = SafeLoss(nn.MSELoss())
    torch._dynamo.reset()
    compiled = torch.compile(lambda p, t, n: safe(p, t, lengths=n), backend="eager")
    pred, target = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    good = torch.tensor([4, 1])
    torch.testing.assert_close(compiled(pred, target, good), safe(pred, target, lengths=good))
    with pytest.raises(RuntimeError, match="lengths must be"):
        compiled(pred, target, torch.tensor([4, 5]))
    torch._dynamo.reset()


def test_masking_needs_an_elementwise_loss_and_a_time_dim() -> None:
    lengths = torch.tensor([1, 2])
    with pytest.raises(TypeError, match="lengths= needs an elementwise loss.*power_loss"):
        SafeLoss(power_loss)(torch.randn(2, 4), torch.randn(2, 4), lengths=lengths)
    with pytest.raises(ValueError, match=r"\(2,\).*none besides the batch"):
        SafeLoss(nn.MSELoss())(torch.randn(2), torch.randn(2), lengths=lengths)
    with pytest.raises(ValueError, match=r"\(2, 4\).*does not know.*pass time_dim="):
        SafeLoss(F.gaussian_nll_loss)(
            torch.randn(2, 4), torch.randn(2, 4), torch.ones(2, 4), lengths=lengths
        )
    with pytest.raises(ValueError, match="'batchmean'"):
        SafeLoss(nn.KLDivLoss(reduction="batchmean"))(
            torch.randn(2, 4), torch.rand(2, 4), lengths=lengths
        )
    with pytest.raises(TypeError, match="first two positional arguments"):
        SafeLoss(nn.MSELoss())(torch.randn(2, 4), target=torch.randn(2, 4), lengths=lengths)

"""SafeLoss: the loss-side half of stableopt.

``SafeLoss(loss, optimizer=opt)`` is called like the loss it wraps. On top of it:

- it reports every training loss to ``opt.observe_loss`` (detached, on the device),
  so a NaN/Inf loss makes the next ``opt.step()`` a skip, even when the gradients
  happen to be finite;
- it counts non-finite losses without a host sync (a device counter, read lazily);
- it trims a prediction/target length mismatch in the time dim (seq2seq, TTS: 100
  decoded frames against 97 target frames) and counts it, only where it knows the
  loss's layout: shapes that fit that layout go through untouched;
- with ``lengths=`` it averages over the valid (unpadded) positions only.

Host syncs added per call and per step on the happy path: **zero**. The non-finite
counter lives on the device. After each ``opt.step()`` a step hook brings it to the
host: on CPU by reading it (free), on CUDA by a non-blocking copy into pinned memory
that is folded in at a later step once its event has completed (no wait). After a
skipped step (a sync the optimizer already paid) and in ``loss_fn.stats()`` /
``loss_fn.events()`` it is read exactly, which is one blocking read. Shapes are
compared on the host (``.shape``); ``lengths`` on the CPU are checked on the host
(free), on CUDA on the device (``torch._assert_async``, no wait).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from stableopt._align import CLASSES, ON_MISMATCH, Aligned, align, layout_of
from stableopt._checks import check_choice, check_float
from stableopt._loss_count import LossCounts
from stableopt._loss_mask import Unreduced, check_lengths, masked_loss
from stableopt.monitor import Event
from stableopt.optimizer import SafeOptimizer, find_safe_optimizer

__all__ = ["ConsistencyLoss", "SafeLoss"]

log = logging.getLogger(__name__)


class SafeLoss(nn.Module):
    r"""Wrap a loss: report it to the optimizer, count NaN/Inf, trim and mask sequences.

    Called with the wrapped loss's own arguments; ``pred`` and ``target`` are the
    first two positional arguments when they are tensors (otherwise, e.g. a Hugging
    Face model output, the call is passed through unchanged). With well-formed
    inputs the value and its gradient are exactly the wrapped loss's.

    **Layouts.** Dim 0 is the batch. SafeLoss changes shapes only where it knows
    the wrapped loss's layout:

    - *element-wise* (``nn.MSELoss``, ``L1Loss``, ``SmoothL1Loss``, ``HuberLoss``,
      ``BCEWithLogitsLoss``, ``BCELoss`` and the ``F.`` functions of the same
      names): the target has the prediction's shape; the time dim is the last
      (``(B, T)``, ``(B, n_mel, T)``);
    - *classes at dim 1* (``nn.CrossEntropyLoss``, ``NLLLoss``, ``F.cross_entropy``,
      ``F.nll_loss``): ``(B, C, *)`` logits against ``(B, *)`` class indices or
      ``(B, C, *)`` probabilities; the time dim is the last, unless that is the
      class dim (``(N, C)`` has none), and the class dim is never trimmed;
    - anything else (a function, another module): no layout and no default time dim.

    A subclass of a listed module counts only if it keeps that module's ``forward``.

    **Length mismatch.** When ``pred`` and ``target`` differ in the time dim only
    (``time_dim``, or the layout's default), of lengths :math:`T_p \ne T_y`, both
    are cut to :math:`T = \min(T_p, T_y)` along it,

    .. math:: L = \ell(\hat y_{[:, \dots, :T, \dots]}, y_{[:, \dots, :T, \dots]}),

    the mismatch is counted (``size_mismatches``) and recorded as an event at the
    1st, 2nd, 4th, 8th, ... occurrence (a log line each, so a run that mismatches
    every step logs :math:`\log_2` of its steps). Every other difference raises
    ``ValueError`` naming both shapes and the fix: a batch size, a class dim, two
    dims, a dim other than the time dim, a rank a known layout does not take, a
    shape difference with a loss of no known layout and no ``time_dim``, and
    ``(B, T, C)`` logits against ``(B, T)`` labels for a class-index loss (which
    would read ``T`` as the classes). With a loss of no known layout a target of
    another rank is never checked or trimmed: the call goes to the loss as it is
    (``F.cross_entropy(logits.flatten(0, 1), labels.flatten())`` inside a function
    sees ``(B, T, V)`` and ``(B, T)`` untouched).

    **Masking.** With ``lengths`` (a 1-D integer tensor, :math:`n_b` valid steps for
    batch item :math:`b`, :math:`0 \le n_b \le` the longer time length of ``pred``
    and ``target``), the mask :math:`m_{b,t} = [t < n_b]` is broadcast over
    every other dim of the elementwise loss :math:`\ell_i` and

    .. math:: L = \frac{\sum_i m_i \ell_i}{\sum_i m_i c_i}, \qquad L = 0 \text{ if } \sum_i m_i c_i = 0,

    with :math:`c_i = 1`, or for class-index targets :math:`c_i = w_{y_i}[y_i \ne
    \text{ignore\_index}]` (the denominator ``CrossEntropyLoss`` itself uses). A
    ``"sum"`` loss gives :math:`\sum_i m_i \ell_i`, a ``"none"`` loss
    :math:`m_i \ell_i`. The elementwise values come from a loss with a
    ``reduction`` attribute (``nn.MSELoss``, ``L1Loss``, ``SmoothL1Loss``,
    ``HuberLoss``, ``BCEWithLogitsLoss``, ``CrossEntropyLoss``, ...; a shallow copy
    set to ``reduction="none"``, sharing its weights), a function with a
    ``reduction`` parameter (``F.mse_loss``, ...), or ``elementwise=True``. The mask
    applies to the time dim, so a loss of no known layout needs ``time_dim``; a
    target of one dim fewer is then read with the classes at dim 1 of ``pred``, and
    its time dim must have the prediction's length. ``lengths`` on the CPU are
    checked at once (``ValueError``); on an accelerator, or under ``torch.compile``,
    on the device, without a sync (``torch._assert_async``: a bad value stops the
    run at the next synchronisation, on CUDA as a device-side assertion).

    **Reporting.** Each call made with gradients enabled passes the detached loss to
    ``optimizer.observe_loss`` (no sync). Calls under ``torch.no_grad()`` or
    ``inference_mode`` (evaluation) are counted but not reported, so validation
    losses do not enter the training-loss signal. A non-finite loss is counted in
    ``nonfinite_losses``; the value returned is the wrapped loss's own (it still
    supports ``.backward()``) and the optimizer skips the step it feeds.

    Args:
        loss: the loss, a callable ``(pred, target, *args, **kwargs) -> Tensor``
            (an ``nn.Module`` such as ``nn.MSELoss()`` or a function).
        optimizer: the :class:`~stableopt.SafeOptimizer` to report to (default
            ``None``: standalone; counters in :meth:`stats` only). When linked,
            ``nonfinite_losses`` and ``size_mismatches`` also appear in
            ``optimizer.stats()`` and the events in ``optimizer.events()``.
        on_mismatch: ``"trim"`` (default: trim a time-dim mismatch, raise on any
            other difference), ``"expected"`` (trim it as ``"trim"`` does, for lengths
            that differ by design, such as two decoders of different reduction factors:
            only counted, in ``expected_mismatches``, with no event, log line or
            recommendation), ``"error"`` (a time-dim mismatch raises ``ValueError``
            too) or ``"ignore"`` (no shape check at all: for losses with their own
            shape contract, such as broadcasting).
        time_dim: the time dim of ``pred``, the one dim that may be trimmed and
            that ``lengths`` masks (negative counts from the end; neither the
            batch nor the class dim). Default ``None``: the last dim for a known
            layout, none otherwise.
        elementwise: the loss returns unreduced values (default ``False``); SafeLoss
            takes their mean (masked with ``lengths``).
        observe: report to ``optimizer.observe_loss`` (default ``True``).

    Extra keyword ``num_items_in_batch`` (Hugging Face ``Trainer(compute_loss_func=
    ...)``) is forwarded only if the wrapped loss takes it (a parameter of that name
    or ``**kwargs``), else dropped. ``lengths`` is forwarded instead of used when the
    wrapped loss has a parameter named ``lengths`` (it masks on its own).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = SafeOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        >>> loss_fn = SafeLoss(torch.nn.MSELoss(), optimizer=opt)
        >>> loss_fn(model(torch.randn(8, 4)), torch.randn(8, 2)).backward()
        >>> opt.step()
        >>> loss_fn.stats()
        {'nonfinite_losses': 0, 'size_mismatches': 0, 'expected_mismatches': 0}
    """

    def __init__(
        self,
        loss: Callable[..., Tensor],
        *,
        optimizer: SafeOptimizer | None = None,
        on_mismatch: str = "trim",
        time_dim: int | None = None,
        elementwise: bool = False,
        observe: bool = True,
    ) -> None:
        super().__init__()
        _check_loss(loss)
        if optimizer is not None and not isinstance(optimizer, SafeOptimizer):
            found = find_safe_optimizer(optimizer)  # accelerate's or Lightning's wrapper
            if found is None:
                raise TypeError(
                    "optimizer must be a stableopt.SafeOptimizer (or a wrapper of one, such "
                    f"as accelerate's) or None, got {type(optimizer).__name__}; wrap it "
                    "first: SafeOptimizer(optimizer)"
                )
            optimizer = found
        if time_dim is not None and (isinstance(time_dim, bool) or not isinstance(time_dim, int)):
            raise TypeError(f"time_dim must be an int or None, got {type(time_dim).__name__}")
        for name, flag in (("elementwise", elementwise), ("observe", observe)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        self.loss = loss
        self.optimizer = optimizer
        self.on_mismatch = check_choice("on_mismatch", on_mismatch, ON_MISMATCH)
        self.time_dim = time_dim
        self.elementwise = elementwise
        self.observe = observe
        self._layout = layout_of(loss)
        parameters = _parameters(loss)
        self._takes_num_items = "num_items_in_batch" in parameters or "**" in parameters
        self._takes_lengths = "lengths" in parameters
        self._unreduced = Unreduced(loss, parameters.get("reduction"), elementwise, _name(loss))
        self._counts = LossCounts(optimizer, log)

    # -- the call ---------------------------------------------------------------------

    def forward(self, *args: Any, lengths: Tensor | None = None, **kwargs: Any) -> Tensor:
        """The wrapped loss of ``args``/``kwargs``, aligned and masked (see the class).

        Args:
            *args: the wrapped loss's positional arguments, ``pred`` and ``target`` first.
            lengths: the valid length of each batch item along the time dim (default
                ``None``: no mask); forwarded instead when the loss has a ``lengths``
                parameter.
            **kwargs: the wrapped loss's keyword arguments.

        Returns:
            The loss, a Tensor supporting ``.backward()``.
        """
        return self._report(self._compute(args, kwargs, lengths))

    def _compute(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], lengths: Tensor | None
    ) -> Tensor:
        if not self._takes_num_items:
            kwargs.pop("num_items_in_batch", None)
        if lengths is not None and self._takes_lengths:
            kwargs["lengths"], lengths = lengths, None
        aligned = None
        if len(args) >= 2 and isinstance(args[0], Tensor) and isinstance(args[1], Tensor):
            aligned = align(
                args[0],
                args[1],
                layout=self._layout,
                time_dim=self.time_dim,
                on_mismatch=self.on_mismatch,
                masking=lengths is not None,
                name=_name(self.loss),
            )
            if aligned.mismatch is not None:
                self._counts.note_mismatch(aligned.mismatch, self.on_mismatch == "expected")
            args = (aligned.pred, aligned.target, *args[2:])
        if lengths is not None:
            if aligned is None:
                raise TypeError(
                    "lengths= needs the prediction and the target as the first two positional "
                    "arguments, both tensors"
                )
            return self._masked(args, kwargs, lengths, aligned)
        value = self.loss(*args, **kwargs)
        if self.elementwise and isinstance(value, Tensor):
            value = value.mean()
        if not isinstance(value, Tensor):
            raise TypeError(
                f"the wrapped loss returned {type(value).__name__}; SafeLoss needs a Tensor"
            )
        return value

    def _masked(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], lengths: Tensor, aligned: Aligned
    ) -> Tensor:
        pred = args[0]
        unreduced, reduction, kwargs = self._unreduced.call(kwargs)
        if aligned.time_dim is None or aligned.steps is None:
            if self._layout is None and self.time_dim is None:
                why = (
                    f"SafeLoss does not know the layout of {_name(self.loss)}, so it does not "
                    "guess which dim is time: pass time_dim="
                )
            else:
                why = "it has none besides the batch (and class) dim"
            raise ValueError(
                f"lengths= masks the time dim of the prediction of shape {tuple(pred.shape)}: {why}"
            )
        where = f"the time dim {aligned.time_dim} (the longer of prediction and target)"
        check_lengths(lengths, int(pred.shape[0]), aligned.steps, where)
        return masked_loss(
            unreduced,
            reduction,
            args,
            kwargs,
            lengths,
            aligned.time_dim,
            class_weight=kwargs.get("weight", getattr(self.loss, "weight", None)),
            ignore_index=kwargs.get("ignore_index", getattr(self.loss, "ignore_index", -100)),
            by_class=self._layout == CLASSES and not self.elementwise,
        )

    def _report(self, value: Tensor) -> Tensor:
        detached = value.detach()
        self._counts.nonfinite.add(~torch.isfinite(detached).all())
        if self.optimizer is not None and self.observe and torch.is_grad_enabled():
            self.optimizer.observe_loss(detached)
        return value

    # -- counters and events ------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """``nonfinite_losses`` and ``size_mismatches`` so far (one blocking device read)."""
        return self._counts.stats()

    def events(self) -> list[Event]:
        """This loss's events, oldest first (one blocking device read).

        ``event.step`` is the optimizer's step counter when linked, else 0.
        """
        return self._counts.events()

    def extra_repr(self) -> str:
        linked = "linked" if self.optimizer is not None else "standalone"
        loss = "" if isinstance(self.loss, nn.Module) else f"loss={_name(self.loss)}, "
        return (
            f"{loss}on_mismatch={self.on_mismatch!r}, time_dim={self.time_dim}, "
            f"elementwise={self.elementwise}, {linked}"
        )


class ConsistencyLoss(SafeLoss):
    r"""Consistency between two outputs of the same model, the second a fixed target.

    .. math:: L = w \cdot \ell(a, \operatorname{sg}(b))

    with :math:`\operatorname{sg}` the stop-gradient (``b.detach()``) and
    :math:`\ell` the mean squared error by default: the gradient flows into ``a``
    only. Used for double-decoder consistency in TTS (Tacotron-style models with a
    coarse and a fine decoder, Coqui TTS's ``ddc``), where the two decoders' outputs
    can differ in length: they are trimmed and masked exactly as in
    :class:`SafeLoss`, and the weighted value is what is reported to the optimizer.

    Args:
        weight: :math:`w \ge 0` (default 1.0).
        loss: :math:`\ell` (default ``None``: ``nn.MSELoss()``, element-wise, time the
            last dim); anything :class:`SafeLoss` accepts.
        optimizer: the :class:`~stableopt.SafeOptimizer` to report to (default
            ``None``: standalone), as in :class:`SafeLoss`.
        on_mismatch: ``"trim"`` (default), ``"expected"`` (the two outputs' lengths
            differ by design: trimmed and only counted, in ``expected_mismatches``),
            ``"error"`` or ``"ignore"``, as in :class:`SafeLoss`.
        time_dim: the time dim (default ``None``: the layout's), as in :class:`SafeLoss`.
        observe: report to ``optimizer.observe_loss`` (default ``True``).
    """

    def __init__(
        self,
        weight: float = 1.0,
        *,
        loss: Callable[..., Tensor] | None = None,
        optimizer: SafeOptimizer | None = None,
        on_mismatch: str = "trim",
        time_dim: int | None = None,
        observe: bool = True,
    ) -> None:
        super().__init__(
            nn.MSELoss() if loss is None else loss,
            optimizer=optimizer,
            on_mismatch=on_mismatch,
            time_dim=time_dim,
            observe=observe,
        )
        self.weight = check_float("weight", weight, minimum=0.0)

    def forward(  # type: ignore[override]
        self, first: Tensor, second: Tensor, *, lengths: Tensor | None = None
    ) -> Tensor:
        """``weight * loss(first, second.detach())``, trimmed and masked like SafeLoss.

        Args:
            first: :math:`a`, the output the gradient flows into.
            second: :math:`b`, the output taken as a fixed target (detached).
            lengths: valid lengths along the time dim (default ``None``: no mask).

        Returns:
            The weighted loss.
        """
        for name, value in (("first", first), ("second", second)):
            if not isinstance(value, Tensor):
                raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")
        return self._report(self.weight * self._compute((first, second.detach()), {}, lengths))

    def extra_repr(self) -> str:
        return f"weight={self.weight:g}, {super().extra_repr()}"


def _check_loss(loss: Any) -> None:
    accepted = (
        "a loss callable: an nn.Module such as nn.MSELoss() or a function (pred, target) -> Tensor"
    )
    if isinstance(loss, type):
        raise TypeError(f"loss must be {accepted}, got the class {loss.__name__}; pass an instance")
    if not callable(loss):
        raise TypeError(f"loss must be {accepted}, got {type(loss).__name__}")


def _parameters(loss: Callable[..., Any]) -> dict[str, Any]:
    """The wrapped callable's parameter names (``"**"`` for ``**kwargs``) and defaults.

    Read once at construction. A callable without a signature (a builtin) reads as
    taking nothing extra: ``num_items_in_batch`` is then dropped.
    """
    target = loss.forward if isinstance(loss, nn.Module) else loss
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return {}
    found: dict[str, Any] = {}
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            found["**"] = None
        elif parameter.kind is not inspect.Parameter.VAR_POSITIONAL:
            default = parameter.default
            found[name] = default if isinstance(default, str) else None
    if "reduction" in found and found["reduction"] is None:
        found["reduction"] = "mean"
    return found


def _name(loss: Any) -> str:
    return getattr(loss, "__qualname__", None) or type(loss).__name__

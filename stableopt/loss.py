"""SafeLoss: the loss-side half of stableopt.

``SafeLoss(loss, optimizer=opt)`` is called like the loss it wraps. On top of it:

- it reports every training loss to ``opt.observe_loss`` (detached, on the device),
  so a NaN/Inf loss makes the next ``opt.step()`` a skip, even when the gradients
  happen to be finite;
- it counts non-finite losses without a host sync (a device counter, read lazily);
- it trims a prediction/target length mismatch in one dim (seq2seq, TTS: 100
  decoded frames against 97 target frames) and counts it;
- with ``lengths=`` it averages over the valid (unpadded) positions only.

Host syncs added per call and per step on the happy path: **zero**. The non-finite
counter lives on the device. After each ``opt.step()`` a step hook brings it to the
host: on CPU by reading it (free), on CUDA by a non-blocking copy into pinned memory
that is folded in at a later step once its event has completed (no wait). After a
skipped step (a sync the optimizer already paid) and in ``loss_fn.stats()`` /
``loss_fn.events()`` it is read exactly, which is one blocking read.
"""

from __future__ import annotations

import copy
import inspect
import logging
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from stableopt._align import ON_MISMATCH, Mismatch, align, masked_loss
from stableopt._checks import check_choice, check_float
from stableopt.monitor import Event
from stableopt.optimizer import SafeOptimizer

__all__ = ["ConsistencyLoss", "SafeLoss"]

log = logging.getLogger(__name__)

_REDUCTIONS = ("mean", "sum", "none")
_MAX_EVENTS = 256


class SafeLoss(nn.Module):
    r"""Wrap a loss: report it to the optimizer, count NaN/Inf, trim and mask sequences.

    Called with the wrapped loss's own arguments; ``pred`` and ``target`` are the
    first two positional arguments when they are tensors (otherwise, e.g. a Hugging
    Face model output, the call is passed through unchanged). With well-formed
    inputs the value and its gradient are exactly the wrapped loss's.

    **Length mismatch.** Dim 0 is the batch. When ``pred`` and ``target`` differ in
    exactly one other dim, of lengths :math:`T_p \ne T_y`, both are cut to
    :math:`T = \min(T_p, T_y)` along it,

    .. math:: L = \ell(\hat y_{[:, \dots, :T, \dots]}, y_{[:, \dots, :T, \dots]}),

    the mismatch is counted (``size_mismatches``) and recorded as an event at the
    1st, 2nd, 4th, 8th, ... occurrence (a log line each, so a run that mismatches
    every step logs :math:`\log_2` of its steps). Any other difference (batch size,
    rank, two dims) raises ``ValueError`` naming both shapes. A target with one dim
    fewer than ``pred`` is read as class indices with the classes at dim 1 of
    ``pred`` (``CrossEntropyLoss``: ``(B, C, T)`` against ``(B, T)``).

    **Masking.** With ``lengths`` (a 1-D integer tensor, :math:`n_b` valid steps for
    batch item :math:`b`), the mask :math:`m_{b,t} = [t < n_b]` is broadcast over
    every other dim of the elementwise loss :math:`\ell_i` and

    .. math:: L = \frac{\sum_i m_i \ell_i}{\sum_i m_i c_i}, \qquad L = 0 \text{ if } \sum_i m_i c_i = 0,

    with :math:`c_i = 1`, or for class-index targets :math:`c_i = w_{y_i}[y_i \ne
    \text{ignore\_index}]` (the denominator ``CrossEntropyLoss`` itself uses). A
    ``"sum"`` loss gives :math:`\sum_i m_i \ell_i`, a ``"none"`` loss
    :math:`m_i \ell_i`. The elementwise values come from a loss with a
    ``reduction`` attribute (``nn.MSELoss``, ``L1Loss``, ``SmoothL1Loss``,
    ``HuberLoss``, ``BCEWithLogitsLoss``, ``CrossEntropyLoss``, ...; a shallow copy
    set to ``reduction="none"``, sharing its weights), a function with a
    ``reduction`` parameter (``F.mse_loss``, ...), or ``elementwise=True``.

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
        on_mismatch: ``"trim"`` (default), ``"error"`` (any shape difference
            raises ``ValueError``) or ``"ignore"`` (no shape check at all: for losses
            with their own shape contract, such as ``CTCLoss``).
        time_dim: the time dim of ``pred`` for masking (negative counts from the
            end). Default ``None``: the mismatched dim if there is one, else the last
            dim. When given, a length mismatch in any other dim raises.
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
        {'nonfinite_losses': 0, 'size_mismatches': 0}
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
            raise TypeError(
                "optimizer must be a stableopt.SafeOptimizer or None, got "
                f"{type(optimizer).__name__}; wrap it first: SafeOptimizer(optimizer)"
            )
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
        parameters = _parameters(loss)
        self._takes_num_items = "num_items_in_batch" in parameters or "**" in parameters
        self._takes_lengths = "lengths" in parameters
        self._reduction_default: str | None = parameters.get("reduction")
        # The elementwise twin is deliberately not a registered submodule: it shares
        # the wrapped loss's parameter and buffer dicts (so .to() moves both) and
        # must not appear twice in state_dict().
        self._unreduced: Callable[..., Tensor] | None = None
        if isinstance(getattr(loss, "reduction", None), str) and isinstance(loss, nn.Module):
            twin = copy.copy(loss)
            object.__setattr__(twin, "reduction", "none")
            object.__setattr__(self, "_unreduced", twin)
        self._nonfinite = _DeviceCount()
        self._nonfinite_folded = 0
        self._size_mismatches = 0
        self._skips_seen = 0
        self._events: deque[Event] = deque(maxlen=_MAX_EVENTS)
        if optimizer is not None:
            for name in ("nonfinite_losses", "size_mismatches"):
                optimizer.monitor.count(name, 0)  # present in opt.stats() from the start
            self._skips_seen = optimizer.monitor.counters["skipped_steps"]
            optimizer.register_step_post_hook(_after_step_hook(self))

    # -- the call ---------------------------------------------------------------------

    def forward(self, *args: Any, lengths: Tensor | None = None, **kwargs: Any) -> Tensor:
        """The wrapped loss of ``args``/``kwargs``, aligned and masked (see the class)."""
        return self._report(self._compute(args, kwargs, lengths))

    def _compute(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], lengths: Tensor | None
    ) -> Tensor:
        if not self._takes_num_items:
            kwargs.pop("num_items_in_batch", None)
        if lengths is not None and self._takes_lengths:
            kwargs["lengths"], lengths = lengths, None
        time_dim = None
        if len(args) >= 2 and isinstance(args[0], Tensor) and isinstance(args[1], Tensor):
            aligned = align(args[0], args[1], time_dim=self.time_dim, on_mismatch=self.on_mismatch)
            if aligned.mismatch is not None:
                self._note_mismatch(aligned.mismatch)
            args = (aligned.pred, aligned.target, *args[2:])
            time_dim = aligned.time_dim
        elif lengths is not None:
            raise TypeError(
                "lengths= needs the prediction and the target as the first two positional "
                "arguments, both tensors"
            )
        if lengths is not None:
            return self._masked(args, kwargs, lengths, time_dim)
        value = self.loss(*args, **kwargs)
        if self.elementwise and isinstance(value, Tensor):
            value = value.mean()
        if not isinstance(value, Tensor):
            raise TypeError(
                f"the wrapped loss returned {type(value).__name__}; SafeLoss needs a Tensor"
            )
        return value

    def _masked(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        lengths: Tensor,
        time_dim: int | None,
    ) -> Tensor:
        unreduced, reduction, kwargs = self._unreduced_call(kwargs)
        return masked_loss(
            unreduced,
            reduction,
            args,
            kwargs,
            lengths,
            time_dim,
            class_weight=kwargs.get("weight", getattr(self.loss, "weight", None)),
            ignore_index=kwargs.get("ignore_index", getattr(self.loss, "ignore_index", -100)),
            by_class=not self.elementwise,
        )

    def _unreduced_call(
        self, kwargs: dict[str, Any]
    ) -> tuple[Callable[..., Tensor], str, dict[str, Any]]:
        """The elementwise form of the loss, the reduction to apply, and the kwargs to pass."""
        if self.elementwise:
            return self.loss, "mean", kwargs
        if self._unreduced is not None:
            reduction = getattr(self.loss, "reduction", "mean")
        elif self._reduction_default is not None:
            reduction = kwargs.get("reduction", self._reduction_default)
            kwargs = {**kwargs, "reduction": "none"}
        else:
            raise TypeError(
                "lengths= needs an elementwise loss: a loss with a `reduction` attribute "
                "(nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.BCEWithLogitsLoss, ...), a function "
                "with a `reduction` parameter (F.mse_loss, ...), or SafeLoss(fn, elementwise=True) "
                f"for a function returning unreduced values; got {_name(self.loss)}"
            )
        if reduction not in _REDUCTIONS:
            raise ValueError(
                f"lengths= supports the reductions {list(_REDUCTIONS)}, the loss has {reduction!r}"
            )
        unreduced = self.loss if self._unreduced is None else self._unreduced
        return unreduced, reduction, kwargs

    def _report(self, value: Tensor) -> Tensor:
        detached = value.detach()
        self._nonfinite.add(~torch.isfinite(detached).all())
        if self.optimizer is not None and self.observe and torch.is_grad_enabled():
            self.optimizer.observe_loss(detached)
        return value

    # Host bookkeeping and logging happen only on a mismatch; under torch.compile
    # they run outside the graph (one graph break, on the mismatch path only).
    @torch.compiler.disable
    def _note_mismatch(self, mismatch: Mismatch) -> None:
        self._size_mismatches += 1
        if self.optimizer is not None:
            self.optimizer.monitor.count("size_mismatches")
        count = self._size_mismatches
        if count & (count - 1) == 0:  # 1, 2, 4, 8, ...: a bounded log
            length = min(mismatch.pred_length, mismatch.target_length)
            self._event(
                "size_mismatch",
                f"prediction {mismatch.pred_shape} and target {mismatch.target_shape} differ "
                f"in dim {mismatch.dim}: both trimmed to {length} "
                f"({count} mismatches so far; reported at the 1st, 2nd, 4th, 8th, ...)",
                pred_length=float(mismatch.pred_length),
                target_length=float(mismatch.target_length),
                size_mismatches=float(count),
            )

    # -- counters and events ------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """``nonfinite_losses`` and ``size_mismatches`` so far (one blocking device read)."""
        self._fold(self._nonfinite.read())
        return {
            "nonfinite_losses": self._nonfinite_folded,
            "size_mismatches": self._size_mismatches,
        }

    def events(self) -> list[Event]:
        """This loss's events, oldest first (one blocking device read).

        ``event.step`` is the optimizer's step counter when linked, else 0.
        """
        self._fold(self._nonfinite.read())
        return list(self._events)

    def _after_step(self) -> None:
        """After ``opt.step()``: bring the non-finite count to the optimizer's monitor."""
        assert self.optimizer is not None
        skipped = self.optimizer.monitor.counters["skipped_steps"]
        was_skipped, self._skips_seen = skipped != self._skips_seen, skipped
        # The skip already cost a sync: read exactly then, never wait otherwise.
        self._fold(self._nonfinite.read() if was_skipped else self._nonfinite.poll())

    def _fold(self, count: int) -> None:
        previous = self._nonfinite_folded
        if count <= previous:
            return
        self._nonfinite_folded = count
        if self.optimizer is not None:
            self.optimizer.monitor.count("nonfinite_losses", count - previous)
        if count.bit_length() > previous.bit_length():  # crossed 1, 2, 4, 8, ...
            self._event(
                "nonfinite_loss",
                f"the loss is NaN/Inf ({count} non-finite losses so far, "
                f"{count - previous} since the last check; reported at the 1st, 2nd, 4th, ...)",
                nonfinite_losses=float(count),
            )

    def _event(self, kind: str, reason: str, **data: float) -> None:
        if self.optimizer is not None:
            event = self.optimizer.monitor.event(kind, reason, **data)  # logs, rate-limited
        else:
            event = Event(0, kind, reason, dict(data))
            log.warning("%s: %s", kind, reason)
        self._events.append(event)

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
        loss: :math:`\ell` (default ``nn.MSELoss()``); anything :class:`SafeLoss` accepts.
        optimizer, on_mismatch, time_dim, observe: as in :class:`SafeLoss`.
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
        """``weight * loss(first, second.detach())``, trimmed and masked like SafeLoss."""
        for name, value in (("first", first), ("second", second)):
            if not isinstance(value, Tensor):
                raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")
        return self._report(self.weight * self._compute((first, second.detach()), {}, lengths))

    def extra_repr(self) -> str:
        return f"weight={self.weight:g}, {super().extra_repr()}"


class _DeviceCount:
    """A count kept on the device; the host learns it without waiting.

    ``add`` is one in-place device add. ``poll`` never blocks: on CPU it reads the
    count (there is no device to wait for); on CUDA it folds the last non-blocking
    copy if its event has completed and starts a new one. ``read`` blocks.
    """

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.known = 0
        self._host: Tensor | None = None
        self._copied: Any = None  # a torch.cuda.Event while a copy is in flight

    def add(self, flag: Tensor) -> None:
        if self.total is None:
            self.total = torch.zeros((), dtype=torch.int64, device=flag.device)
        self.total.add_(flag.to(self.total.device))

    def poll(self) -> int:
        if self.total is None:
            return self.known
        if self.total.device.type != "cuda":
            return self.read()
        if self._copied is not None and self._copied.query():
            assert self._host is not None
            self.known = max(self.known, int(self._host))  # pinned host memory: no sync
            self._copied = None
        if self._copied is None:
            if self._host is None:
                self._host = torch.zeros((), dtype=torch.int64, pin_memory=True)
            self._host.copy_(self.total, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        return self.known

    def read(self) -> int:
        if self.total is not None:
            self.known = int(self.total)
        return self.known


def _after_step_hook(loss_fn: SafeLoss) -> Callable[..., None]:
    # A weak reference: the optimizer must not keep a discarded loss alive.
    ref = weakref.ref(loss_fn)

    def after_step(optimizer: Any, args: Any, kwargs: Any) -> None:
        target = ref()
        if target is not None:
            target._after_step()

    return after_step


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

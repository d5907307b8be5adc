"""Hugging Face ``Trainer`` integration (``pip install 'stableopt[hf]'``).

A :class:`~stableopt.SafeOptimizer` is an ordinary ``torch.optim.Optimizer``, so
``Trainer(optimizers=(SafeOptimizer(AdamW(...)), None))`` trains as is. This module adds:

- :class:`StableOptCallback`: our metrics (``stableopt/...``) in every training log of
  the Trainer (``trainer.state.log_history`` and every ``report_to`` integration, in the
  same call as Trainer's ``loss``), Trainer's own clipping turned off when ours is on, and
  the model's training loss reported to the optimizer;
- :func:`safe_optimizers`: the optimizer (AdamW by default) and the LR schedule that
  Trainer would build from its ``TrainingArguments``, the optimizer wrapped.

A step we skip or roll back is a skipped step for Trainer too: accelerate's
``optimizer_step_was_skipped`` asks the SafeOptimizer's ``step_was_skipped`` (see
``stableopt._accelerate``), so Trainer does not step its LR scheduler after it, as after
GradScaler's overflow skip: the schedule counts the updates that ran.
"""

from __future__ import annotations

import inspect
import logging
import re
from typing import Any, cast

from torch import nn

try:
    import transformers
    from transformers import TrainerCallback, TrainingArguments
    from transformers.trainer_callback import CallbackHandler
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "stableopt.integrations.hf needs transformers and accelerate: pip install 'stableopt[hf]'"
    ) from exc

import torch

from stableopt.integrations import find_safe_optimizer
from stableopt.optimizer import SafeOptimizer
from stableopt.sinks._common import metric_values

__all__ = ["StableOptCallback", "safe_optimizers"]

log = logging.getLogger(__name__)

#: Parameter names that get no weight decay, as in ``Trainer.get_decay_parameter_names``
#: (transformers 4.47+); used only if calling Trainer's own method fails.
_NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


class StableOptCallback(TrainerCallback):
    """Put a SafeOptimizer's metrics into Trainer's logs; keep Trainer off our clipping.

    ``Trainer(..., optimizers=(opt, sched), callbacks=[StableOptCallback()])``. The
    callback finds the :class:`~stableopt.SafeOptimizer` through accelerate's wrapper
    (or takes ``optimizer=``) and:

    - **logs**: every training log (the one that carries ``loss``) gets
      ``stableopt/<name>`` for each of :data:`stableopt.sinks._common.METRICS`
      (``skipped_steps``, ``grad_norm``, ``lr_factor``, ...), in
      ``trainer.state.log_history`` and in what every ``report_to`` integration
      (MLflow, TensorBoard, W&B, ...) receives. Trainer calls its reporting callbacks
      before the user's, so the callback moves itself to the front of the Trainer's
      callback list (at ``on_init_end`` and again at ``on_train_begin``): its
      ``on_log`` then adds the keys to the ``logs`` dict before any reporter reads it.
    - **clipping**: Trainer clips to ``args.max_grad_norm`` (default 1.0) before
      ``optimizer.step()``, so our clip policy and guards would only see clipped
      gradients. When the SafeOptimizer clips, ``on_train_begin`` sets
      ``args.max_grad_norm = 0.0`` (Trainer reads it at every step) and logs it.
      ``stableopt/grad_norm`` is then the norm before any clipping (transformers 5
      still logs its own ``grad_norm``, computed in one more pass; 4.x logs none).
    - **loss**: a forward hook on the model hands the training loss of every
      forward (``outputs.loss``) to ``opt.observe_loss``, so a NaN loss is a skip
      even when the gradients happen to be finite, and the loss-spike guard and
      plateau scheduling work. With ``compute_loss_func=SafeLoss(..., optimizer=opt)``
      the model returns no loss and SafeLoss reports it instead.

    Args:
        optimizer: the SafeOptimizer; default: found in the Trainer's optimizer.
        prefix: prefix of the metric names (default ``"stableopt/"``).
        disable_trainer_clipping: set ``args.max_grad_norm = 0.0`` when ours clips.
        observe_loss: report the model's training loss to the optimizer.
    """

    def __init__(
        self,
        optimizer: SafeOptimizer | None = None,
        *,
        prefix: str = "stableopt/",
        disable_trainer_clipping: bool = True,
        observe_loss: bool = True,
    ) -> None:
        if optimizer is not None:
            safe = find_safe_optimizer(optimizer)
            if safe is None:
                raise TypeError(
                    f"optimizer must be a SafeOptimizer or None, got {type(optimizer).__name__}"
                )
            optimizer = safe
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        self.optimizer = optimizer
        self.prefix = prefix
        self.disable_trainer_clipping = disable_trainer_clipping
        self.observe_loss = observe_loss
        self._hook: Any = None
        self._warned = False

    # -- ordering: first of all callbacks -----------------------------------------

    def _move_to_front(self) -> bool:
        """Move this callback to the front of the calling ``CallbackHandler``'s list.

        ``CallbackHandler.call_event`` does not pass itself to the callbacks, so the
        handler is found as the ``self`` of the calling frame. Moving an element to the
        front while ``call_event`` iterates the list neither skips nor repeats a callback.
        """
        frame = inspect.currentframe()
        try:
            for _ in range(8):
                frame = frame.f_back if frame is not None else None
                if frame is None:
                    break
                handler = frame.f_locals.get("self")
                if isinstance(handler, CallbackHandler):
                    callbacks = handler.callbacks
                    if callbacks and callbacks[0] is not self and self in callbacks:
                        callbacks.remove(self)
                        callbacks.insert(0, self)
                    return True
        finally:
            del frame
        return False

    def on_init_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self._move_to_front()

    def on_train_begin(
        self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any
    ) -> None:
        if not self._move_to_front():
            log.warning(
                "StableOptCallback could not move itself before the report_to callbacks: "
                "stableopt/* metrics reach trainer.state.log_history but may miss them"
            )
        safe = self._safe(kwargs.get("optimizer"))
        if safe is None:
            return
        if self.disable_trainer_clipping and safe.clip is not None and args.max_grad_norm > 0:
            log.info(
                "stableopt clips the gradients (%s): Trainer's own clipping is turned off "
                "(args.max_grad_norm %s -> 0.0) so that our policies see the raw gradients",
                type(safe.clip).__name__,
                args.max_grad_norm,
            )
            args.max_grad_norm = 0.0
        model = kwargs.get("model")
        if self.observe_loss and isinstance(model, nn.Module) and self._hook is None:
            self._hook = model.register_forward_hook(_loss_hook(safe))

    def on_train_end(
        self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any
    ) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_log(
        self,
        args: TrainingArguments,
        state: Any,
        control: Any,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs or "loss" not in logs:
            return  # eval logs and the end-of-training summary
        safe = self._safe(kwargs.get("optimizer"))
        if safe is None:
            return
        ours = {self.prefix + k: v for k, v in metric_values(safe.stats()).items()}
        # Trainer.log appended a shallow copy of ``logs`` to the history just before
        # on_log: the same value objects (``is``: a NaN grad_norm is not == itself).
        history = state.log_history
        if (
            history
            and history[-1].get("step") == state.global_step
            and all(history[-1].get(k) is v or history[-1].get(k) == v for k, v in logs.items())
        ):
            history[-1].update(ours)
        logs.update(ours)

    def _safe(self, optimizer: Any) -> SafeOptimizer | None:
        # Looked up at each call rather than cached: the callback may serve another Trainer.
        safe = self.optimizer if self.optimizer is not None else find_safe_optimizer(optimizer)
        if safe is None and not self._warned:
            log.warning(
                "StableOptCallback: the Trainer's optimizer is not a SafeOptimizer (%s); "
                "pass optimizers=(SafeOptimizer(...), None) or use safe_optimizers()",
                type(optimizer).__name__,
            )
            self._warned = True
        return safe


def _loss_hook(safe: SafeOptimizer) -> Any:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            safe.observe_loss(loss)

    return hook


def _decay_parameter_names(model: nn.Module) -> list[str]:
    """The names of the parameters that get weight decay, as Trainer decides them.

    ``Trainer.get_decay_parameter_names`` does not read ``self`` (transformers 4.44 to
    5.x), so it is called without a Trainer: the grouping then follows Trainer's own
    rule, version by version. Should a version need ``self``, the rule of 4.47+ is
    applied here (no decay for ``nn.LayerNorm`` parameters, biases and norm weights).
    """
    try:
        return list(cast(Any, transformers.Trainer).get_decay_parameter_names(None, model))
    except AttributeError:
        patterns = [re.compile(p) for p in _NO_DECAY_PATTERNS]
        norm_params = {
            id(p)
            for m in model.modules()
            if isinstance(m, nn.LayerNorm)
            for p in m.parameters(recurse=False)
        }
        return [
            name
            for name, param in model.named_parameters()
            if id(param) not in norm_params and not any(p.search(name.lower()) for p in patterns)
        ]


def safe_optimizers(
    model: nn.Module,
    args: TrainingArguments,
    *,
    num_training_steps: int | None = None,
    **safe_kwargs: Any,
) -> tuple[SafeOptimizer, Any]:
    """The optimizer and schedule Trainer would build from ``args``, the optimizer wrapped.

    The optimizer is the one of ``args.optim`` (AdamW by default, ``fused`` where
    Trainer picks ``adamw_torch_fused``), built as ``Trainer.create_optimizer`` builds
    it: ``args.learning_rate``, ``adam_beta1/2``, ``adam_epsilon``, ``optim_args``, and
    two groups, ``weight_decay`` on the weights and none on biases and norm weights
    (``Trainer.get_decay_parameter_names``). It is wrapped in
    ``SafeOptimizer(..., **safe_kwargs)``. The scheduler is
    ``transformers.get_scheduler(args.lr_scheduler_type, ...)`` with Trainer's warm-up
    (``warmup_steps`` or ``warmup_ratio``) and ``lr_scheduler_kwargs``. When our clipping
    is on, ``args.max_grad_norm`` is set to 0.0: Trainer's clipping is turned off.

    Args:
        model: the model to train.
        args: the Trainer's ``TrainingArguments``.
        num_training_steps: the schedule's length; default ``args.max_steps``
            (required when ``max_steps`` is not set).
        **safe_kwargs: passed to :class:`~stableopt.SafeOptimizer`.

    Returns:
        ``(optimizer, scheduler)``, for ``Trainer(optimizers=...)``; the scheduler is
        what ``get_scheduler`` returns (a ``LambdaLR`` for most schedule types).

    Raises:
        ValueError: no schedule length, or an ``args.optim`` that Trainer builds in a
            special way (GaLore, layer-wise, ...): build that one and wrap it yourself.

    Example:
        >>> args = TrainingArguments("out", max_steps=1000, learning_rate=3e-4)  # doctest: +SKIP
        >>> trainer = Trainer(model, args, train_dataset=data,
        ...                   optimizers=safe_optimizers(model, args),
        ...                   callbacks=[StableOptCallback()])  # doctest: +SKIP
    """
    if not isinstance(args, TrainingArguments):
        raise TypeError(f"args must be a TrainingArguments, got {type(args).__name__}")
    steps = num_training_steps if num_training_steps is not None else args.max_steps
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(
            "num_training_steps must be a positive int: pass it, or set args.max_steps "
            f"(got num_training_steps={num_training_steps!r}, max_steps={args.max_steps!r})"
        )
    optimizer_cls, optimizer_kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(
        args,
        model,  # type: ignore[arg-type]
    )
    if not (
        isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)
    ) or ({"params", "optimizer_dict"} & set(optimizer_kwargs)):
        raise ValueError(
            f"safe_optimizers builds the optimizers Trainer makes from parameter groups alone "
            f"(args.optim='adamw_torch', 'adamw_torch_fused', 'sgd', ...), not args.optim="
            f"{args.optim!r}: build it yourself and pass SafeOptimizer(it)"
        )
    decay_names = set(_decay_parameter_names(model))
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if name in decay_names else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    inner = optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs)
    optimizer = SafeOptimizer(inner, **safe_kwargs)
    scheduler = transformers.get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.get_warmup_steps(steps),
        num_training_steps=steps,
        scheduler_specific_kwargs=(
            args.lr_scheduler_kwargs if isinstance(args.lr_scheduler_kwargs, dict) else None
        )
        or None,
    )
    if optimizer.clip is not None and args.max_grad_norm > 0:
        log.info(
            "stableopt clips the gradients: args.max_grad_norm %s -> 0.0 (Trainer's clip off)",
            args.max_grad_norm,
        )
        args.max_grad_norm = 0.0
    return optimizer, scheduler

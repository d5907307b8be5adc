"""SafeOptimizer: the step pipeline around any ``torch.optim.Optimizer``.

``step()`` reads top to bottom as the stages of the pipeline::

    loss     = closure()                      (under enable_grad, if given)
    stats    = grad_stats(grads)              one foreach pass: total norm + finite flag
    clip     = policy.decide(stats)           clip coefficient, on the device
    guard    : non-finite gradients           -> skip, inner state untouched
    inner.step()                              coefficient and skip ride in grad_scale /
                                              found_inf for fused optimizers
    verify   : weights finite?                no -> restore the last good snapshot
    snapshot : every N good steps
    monitor  : counters, health, events; DivergenceError past the failure budget

Host syncs per step: a fused inner optimizer (``fused=True`` Adam, AdamW, SGD,
Adagrad) takes the skip through ``found_inf``, so the step reads the device once,
after the update, for the weight check and the counters. Any other optimizer must
know before its update whether to run it: one read before and one after (one in
all when the step is skipped). Events read their numbers only when they happen.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from stableopt._checks import check_int
from stableopt.clipping import ClipDecision, ClipPolicy, resolve_clip
from stableopt.emergency import EmergencyClip
from stableopt.errors import DivergenceError
from stableopt.monitor import Event, Monitor
from stableopt.rollback import Rollback
from stableopt.stats import GradStats, all_finite, grad_stats, scale_

__all__ = ["SafeOptimizer"]

log = logging.getLogger(__name__)

_STATE_KEY = "stableopt"
_FORMAT_VERSION = 1
_HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


class SafeOptimizer(Optimizer):
    """Wrap a torch optimizer so that no bad step reaches the weights.

    It is a :class:`torch.optim.Optimizer`: ``param_groups``, ``state`` and
    ``defaults`` are the wrapped optimizer's own objects (LR schedulers, GradScaler
    and checkpointing code see the real thing), and ``step()`` runs the pipeline
    described in the module docstring.

    Args:
        optimizer: the optimizer to wrap (any ``torch.optim.Optimizer`` instance).
        clip: gradient clipping: ``None`` (off), a positive number (a fixed max
            norm, identical to ``torch.nn.utils.clip_grad_norm_``), or a
            :class:`~stableopt.clipping.ClipPolicy`.
        emergency: the emergency stage on top of the clip policy: a total norm
            above 1000 clips to half the policy's threshold for a cool-down window.
            ``"default"`` is ``EmergencyClip()``; ``None`` turns it off. It acts
            only when ``clip`` is set.
        rollback: the snapshot stage that undoes a step which left non-finite
            weights. ``"default"`` is ``Rollback(every_steps=100, device="cpu")``:
            one copy of the parameters and optimizer state in host memory (3x the
            parameter bytes for Adam/AdamW). ``None`` turns it off; a step that
            corrupts the weights then raises :class:`DivergenceError` at once.
        max_consecutive_failures: raise :class:`DivergenceError` after this many
            consecutive skipped or rolled-back steps (default 10, ``>= 1``).
        check_weights: check after every update that the weights are finite
            (default ``True``; one max-abs foreach pass over the updated weights).
        monitor: where counters and events are kept (default ``Monitor()``).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
        >>> opt.stats()["steps"]
        1
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        clip: ClipPolicy | float | str | None = None,
        emergency: EmergencyClip | Literal["default"] | None = "default",
        rollback: Rollback | Literal["default"] | None = "default",
        max_consecutive_failures: int = 10,
        check_weights: bool = True,
        monitor: Monitor | None = None,
    ) -> None:
        _check_optimizer(optimizer)
        if emergency == "default":
            emergency = EmergencyClip()
        elif emergency is not None and not isinstance(emergency, EmergencyClip):
            raise TypeError(
                f"emergency must be an EmergencyClip, 'default' or None, got {emergency!r}"
            )
        if rollback == "default":
            rollback = Rollback()
        elif rollback is not None and not isinstance(rollback, Rollback):
            raise TypeError(f"rollback must be a Rollback, 'default' or None, got {rollback!r}")
        if not isinstance(check_weights, bool):
            raise TypeError(f"check_weights must be a bool, got {check_weights!r}")
        if monitor is not None and not isinstance(monitor, Monitor):
            raise TypeError(f"monitor must be a Monitor or None, got {type(monitor).__name__}")

        # Deliberately not Optimizer.__init__: it would build param_groups of its own,
        # and param_groups/state must stay the inner optimizer's objects.
        torch._C._log_api_usage_once("python.stableopt.SafeOptimizer")
        self.optimizer = optimizer
        self.clip = resolve_clip(clip)
        self.emergency = emergency if self.clip is not None else None
        self.rollback = rollback
        self.max_consecutive_failures = check_int(
            "max_consecutive_failures", max_consecutive_failures, minimum=1
        )
        self.check_weights = check_weights
        self.monitor = monitor if monitor is not None else Monitor()
        self._last_grad_norm: Tensor | None = None
        self._last_threshold: Tensor | None = None
        self._init_hooks()

    # -- the inner optimizer's objects, never copies -------------------------------

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        """The inner optimizer's ``param_groups`` (the same list object)."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        """The inner optimizer's ``state`` (the same dict object)."""
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        """The inner optimizer's ``defaults``."""
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients, as the inner optimizer does."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the inner optimizer (a new snapshot follows)."""
        self.optimizer.add_param_group(param_group)
        if self.rollback is not None:
            self.rollback.invalidate()

    # -- the pipeline ------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Run one guarded optimization step; return the closure's loss, if any.

        Raises:
            DivergenceError: after ``max_consecutive_failures`` consecutive failed
                steps; the weights are then the last good ones.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.monitor.count("steps")
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        if self.rollback is not None and not self.rollback.has_snapshot:
            # The state before this step is good: it was verified after the last step.
            self.rollback.take(self.optimizer, self.monitor.counters["steps"] - 1)

        stats = grad_stats(grads)
        decision = self._clip_decision(stats, grads, params)
        is_ok = (
            stats.is_finite
            if decision is None or decision.is_garbage is None
            else (stats.is_finite & ~decision.is_garbage)
        )
        is_fused = self._takes_found_inf(len(params))

        if not is_fused and not bool(is_ok):  # host read 1 of 2 (non-fused only)
            self._finish_skip(stats, decision)
            return loss
        self._inner_step(grads, is_ok, decision, is_fused)
        if self.clip is not None:
            self.clip.observe(stats.grad_norm, is_ok)
        if self.emergency is not None:
            self.emergency.observe(stats.grad_norm, is_ok)
        weights_ok = all_finite(params) if self.check_weights else torch.ones((), dtype=torch.bool)
        flags = [is_ok, weights_ok]
        if decision is not None:
            flags.append(decision.is_clipped)
            if decision.is_emergency is not None:
                flags.append(decision.is_emergency)
        device = stats.grad_norm.device
        step_ok, weights_ok_, *clip_flags = (
            bool(x) for x in torch.stack([f.to(device) for f in flags]).tolist()
        )  # the one host read after the update
        if not weights_ok_:  # checked first: a skipped fused step must not have written either
            self._finish_rollback(stats)
        elif not step_ok:
            self._finish_skip(stats, decision)
        else:
            self._finish_good_step(stats, decision, *clip_flags)
        return loss

    def _clip_decision(
        self, stats: GradStats, grads: list[Tensor], params: list[Tensor]
    ) -> ClipDecision | None:
        self._last_grad_norm = stats.grad_norm
        if self.clip is None:
            self._last_threshold = None
            return None
        decision = self.clip.decide(stats.grad_norm, grads, params)
        if self.emergency is not None:
            decision = self.emergency.adjust(stats.grad_norm, decision)
        self._last_threshold = decision.threshold
        return decision

    def _takes_found_inf(self, n_params_with_grad: int) -> bool:
        # Fused kernels skip the update when found_inf is set, but they create the
        # state of a parameter first; until every parameter has state, decide on the
        # host so that a bad first step leaves the state exactly as it was (empty).
        return bool(getattr(self.optimizer, "_step_supports_amp_scaling", False)) and (
            len(self.optimizer.state) >= n_params_with_grad
        )

    def _inner_step(
        self, grads: list[Tensor], is_ok: Tensor, decision: ClipDecision | None, is_fused: bool
    ) -> None:
        coefficient = decision.coefficient if decision else None
        if not is_fused:
            if coefficient is not None:
                scale_(grads, coefficient)
            self.optimizer.step()
            return
        # GradScaler's protocol: the fused kernel divides every gradient by
        # grad_scale and leaves weights and state alone when found_inf is non-zero.
        inner: Any = self.optimizer
        inner.found_inf = (~is_ok).to(torch.float32)
        if coefficient is not None:
            inner.grad_scale = coefficient.to(torch.float32).reciprocal()
        try:
            self.optimizer.step()
        finally:
            for name in ("found_inf", "grad_scale"):
                if name in inner.__dict__:
                    delattr(inner, name)

    def _finish_good_step(
        self,
        stats: GradStats,
        decision: ClipDecision | None,
        is_clipped: bool = False,
        is_emergency: bool = False,
    ) -> None:
        self.monitor.count("good_steps")
        if is_clipped:
            self.monitor.count("total_clips")
        if is_emergency and decision is not None:
            self.monitor.count("emergency_clips")
            self.monitor.event(
                "emergency_clip",
                f"gradient norm {float(stats.grad_norm):.4g} is above the emergency threshold: "
                f"clipped to {float(decision.threshold):.4g}",
                grad_norm=float(stats.grad_norm),
                clip_threshold=float(decision.threshold),
            )
        self.monitor.record_step("emergency_clip" if is_emergency else "ok")
        if self.rollback is not None and self.rollback.is_due(self.monitor.counters["good_steps"]):
            self.rollback.take(self.optimizer, self.monitor.counters["steps"])

    def _finish_skip(self, stats: GradStats, decision: ClipDecision | None) -> None:
        self.monitor.count("skipped_steps")
        grad_norm = float(stats.grad_norm)
        if math.isfinite(grad_norm):
            assert self.emergency is not None and self.emergency.skip_above is not None
            cause = (
                f"gradient norm {grad_norm:.4g} is above skip_above={self.emergency.skip_above:g}"
            )
        else:
            cause = f"gradient norm is {grad_norm} (NaN/Inf in the gradients)"
        self.monitor.event(
            "skip",
            f"{cause}: step skipped, weights and optimizer state unchanged",
            grad_norm=grad_norm,
        )
        self.monitor.record_step("skip")
        self._check_failure_budget()

    def _finish_rollback(self, stats: GradStats) -> None:
        if self.rollback is None or not self.rollback.has_snapshot:
            self.monitor.event("divergence", "the step left non-finite weights and rollback is off")
            raise DivergenceError(
                "stableopt: the step left non-finite weights and rollback is off, so they cannot "
                f"be restored. {self._summary()}",
                self.stats(),
                self.monitor.events(),
            )
        self.rollback.restore(self.optimizer)
        self.monitor.count("rollbacks")
        snapshot_step = self.rollback.snapshot_step
        self.monitor.event(
            "rollback",
            f"the update left non-finite weights (gradient norm {float(stats.grad_norm):.4g}): "
            f"weights and optimizer state restored to the snapshot of step {snapshot_step}",
            grad_norm=float(stats.grad_norm),
            snapshot_step=float(snapshot_step or 0),
        )
        self.monitor.record_step("rollback")
        self._check_failure_budget()

    def _check_failure_budget(self) -> None:
        failures = self.monitor.counters["consecutive_failures"]
        if failures < self.max_consecutive_failures:
            return
        self.monitor.event(
            "divergence",
            f"{failures} consecutive failed steps (max_consecutive_failures="
            f"{self.max_consecutive_failures}): the run is diverging",
            consecutive_failures=float(failures),
        )
        raise DivergenceError(
            f"stableopt: {failures} consecutive steps were skipped or rolled back "
            f"(max_consecutive_failures={self.max_consecutive_failures}); the weights are the "
            f"last good ones. {self._summary()}",
            self.stats(),
            self.monitor.events(),
        )

    def _summary(self) -> str:
        counters = ", ".join(f"{k}={v}" for k, v in self.stats().items() if k in Monitor.COUNTERS)
        recent = "; ".join(
            f"step {e.step} {e.kind}: {e.reason}" for e in self.monitor.events()[-5:]
        )
        return f"Counters: {counters}. Last events: {recent}"

    # -- what it did ----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters and the latest numbers of the run (reading them may sync).

        Keys: ``steps`` (calls to ``step()``), ``good_steps``, ``skipped_steps``,
        ``rollbacks``, ``consecutive_failures``, ``total_clips``,
        ``emergency_clips``, ``lr_changes``, ``emergency_mode``,
        ``system_health`` (in [0, 1], see :class:`~stableopt.monitor.Monitor`),
        ``grad_norm`` (the last pre-clip total norm) and ``clip_threshold`` (the
        last max norm; ``None`` when clipping is off).
        """
        stats: dict[str, Any] = dict(self.monitor.counters)
        stats["emergency_mode"] = False
        stats["system_health"] = self.monitor.health
        stats["grad_norm"] = _to_float(self._last_grad_norm)
        stats["clip_threshold"] = _to_float(self._last_threshold)
        return stats

    def events(self) -> list[Event]:
        """The recent interventions, oldest first."""
        return self.monitor.events()

    # -- checkpoints ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus a ``"stableopt"`` entry for every stage.

        The inner entries (``state``, ``param_groups``) stay at the top level, so
        tools that read an optimizer state dict keep working; ``"stableopt"`` holds
        the counters, events, clip history and rollback bookkeeping.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = dict(self.optimizer.state_dict())
        state_dict[_STATE_KEY] = {
            "format": _FORMAT_VERSION,
            "optimizer_class": _qualname(self.optimizer),
            "clip_class": _qualname(self.clip) if self.clip is not None else None,
            "clip": self.clip.state_dict() if self.clip is not None else None,
            "emergency": self.emergency.state_dict() if self.emergency is not None else None,
            "rollback": self.rollback.state_dict() if self.rollback is not None else None,
            "monitor": self.monitor.state_dict(),
            "last_grad_norm": self._last_grad_norm,
            "last_threshold": self._last_threshold,
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or a plain inner-optimizer one).

        Raises:
            ValueError: the state dict comes from a different setup (another inner
                optimizer class, another clip policy, different parameter groups).
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, dict(state_dict))
            if result is not None:
                state_dict = result
        if (
            not isinstance(state_dict, Mapping)
            or "state" not in state_dict
            or "param_groups" not in state_dict
        ):
            raise ValueError(
                "state_dict must be an optimizer state dict with 'state' and 'param_groups' entries"
            )
        ours = state_dict.get(_STATE_KEY)
        if ours is not None:
            self._check_same_setup(ours)
        self.optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != _STATE_KEY})
        if ours is None:
            log.info(
                "state dict holds no stableopt entry (a plain optimizer checkpoint): counters start at 0"
            )
            self.monitor.load_state_dict(Monitor().state_dict())
            if self.rollback is not None:
                self.rollback.invalidate()
        else:
            if self.clip is not None:
                self.clip.load_state_dict(ours["clip"])
            if self.emergency is not None and ours.get("emergency") is not None:
                self.emergency.load_state_dict(ours["emergency"])
            if self.rollback is not None:
                self.rollback.load_state_dict(ours["rollback"] or {}, self.optimizer)
            self.monitor.load_state_dict(ours["monitor"])
            self._last_grad_norm = ours.get("last_grad_norm")
            self._last_threshold = ours.get("last_threshold")
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _check_same_setup(self, ours: Mapping[str, Any]) -> None:
        if not isinstance(ours, Mapping) or ours.get("format") != _FORMAT_VERSION:
            raise ValueError(
                f"state_dict['{_STATE_KEY}'] is not a stableopt state of format {_FORMAT_VERSION}"
            )
        expected = {
            "optimizer_class": _qualname(self.optimizer),
            "clip_class": _qualname(self.clip) if self.clip is not None else None,
        }
        for key, value in expected.items():
            if ours.get(key) != value:
                raise ValueError(
                    f"state_dict comes from a different setup: {key} is {ours.get(key)!r} in the "
                    f"state dict but {value!r} here"
                )
        if (ours.get("rollback") is None) != (self.rollback is None):
            raise ValueError(
                "state_dict comes from a different setup: rollback is "
                f"{'off' if ours.get('rollback') is None else 'on'} in the state dict but "
                f"{'off' if self.rollback is None else 'on'} here"
            )

    # -- plumbing ---------------------------------------------------------------------

    def _init_hooks(self) -> None:
        for name in _HOOK_DICTS:
            setattr(self, name, OrderedDict())
        self._patch_step_function()

    def __getstate__(self) -> dict[str, Any]:
        # Hooks and the LR scheduler's instance-level ``step`` wrapper are closures:
        # like torch.optim.Optimizer, do not pickle them.
        excluded = {*_HOOK_DICTS, "step", "_opt_called", "_zero_grad_profile_name"}
        return {k: v for k, v in self.__dict__.items() if k not in excluded}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_hooks()

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return (
            f"{type(self).__name__}(\n{inner}\n    clip={self.clip!r}, rollback={self.rollback!r}, "
            f"max_consecutive_failures={self.max_consecutive_failures}, "
            f"check_weights={self.check_weights}\n)"
        )


def _check_optimizer(optimizer: Any) -> None:
    accepted = "a torch.optim.Optimizer instance, e.g. SafeOptimizer(torch.optim.AdamW(model.parameters()))"
    if isinstance(optimizer, SafeOptimizer):
        raise TypeError("optimizer is already a SafeOptimizer; wrap the inner optimizer once")
    if isinstance(optimizer, type):
        raise TypeError(f"optimizer must be {accepted}, got the class {optimizer.__name__}")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be {accepted}, got {type(optimizer).__name__}")


def _qualname(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _to_float(value: Tensor | None) -> float | None:
    return None if value is None else float(value)

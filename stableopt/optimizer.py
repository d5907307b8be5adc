"""SafeOptimizer: the step pipeline around any ``torch.optim.Optimizer``.

``step()`` reads top to bottom as the stages of the pipeline::

    loss     = closure()                      (under enable_grad, if given)
    stats    = grad_stats(grads)              one foreach pass: the total norm (and the loss mean)
    verdict  : skip? clip coefficient?        non-finite, spike, garbage -> skip (stableopt._gate)
    inner.step()                              the coefficient (and, fused, the skip) ride in
                                              grad_scale / found_inf
    verify   : weights finite?                no -> restore the last good snapshot
    observe  : histories take the step's numbers (accepted steps only, on the host)
    snapshot : every N good steps
    respond  : counters, health, events, LR; DivergenceError past the failure budget

The verdict is decided in floats when every gradient is a plain CPU tensor
(reading a CPU number is not a sync), else on the device: then a fused inner
optimizer (``fused=True`` Adam, AdamW, SGD, Adagrad) takes the skip through
``found_inf`` and the step reads the device once, after the update; any other
optimizer must know before its update whether to run it, and reads once, before.
Events and ``stats()`` use the numbers already read.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from stableopt import checkpoint, recommend
from stableopt._checks import check_choice, check_int
from stableopt._gate import StepGate
from stableopt._response import StepResponse
from stableopt.agc import UnitwiseClip
from stableopt.clipping import ClipPolicy, resolve_clip
from stableopt.emergency import EmergencyClip
from stableopt.lr import EmergencyLR, PlateauLR, scaled_lr
from stableopt.monitor import Event, Monitor
from stableopt.recommend import Recommendation
from stableopt.rollback import Rollback
from stableopt.spike import SpikeGuard
from stableopt.stats import all_finite, grad_stats, scale_

__all__ = ["SafeOptimizer"]

log = logging.getLogger(__name__)

_WEIGHT_CHECKS = ("lazy", "every_step", "off")

#: Device flags that are read for counting and events, not reasons to skip.
_NOT_BAD = frozenset({"clipped", "emergency_clip"})

_HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


class SafeOptimizer(StepGate, StepResponse, Optimizer):
    """Wrap a torch optimizer so that no bad step reaches the weights.

    It is a :class:`torch.optim.Optimizer`: ``param_groups``, ``state`` and
    ``defaults`` are the wrapped optimizer's own objects (LR schedulers, GradScaler
    and checkpointing code see the real thing), and ``step()`` runs the pipeline
    described in the module docstring. Every stage is an object with good
    defaults; pass your own to configure it, or ``None`` to turn it off.

    Args:
        optimizer: the optimizer to wrap (any ``torch.optim.Optimizer`` instance).
        clip: gradient clipping: a policy name (``"zscore"``, the default: ZClip;
            ``"percentile"``: AutoClip; ``"agc"``: unit-wise AGC), a positive number
            (a fixed max norm, identical to ``torch.nn.utils.clip_grad_norm_``), a
            :class:`~stableopt.clipping.ClipPolicy`, or ``None`` (off).
        emergency_clip: on top of the clip policy, a total norm above 1000 clips to
            half the policy's threshold for a cool-down window
            (:class:`~stableopt.emergency.EmergencyClip`). Acts only when ``clip`` is set.
        spike: skip steps whose loss or gradient norm is an outlier
            (:class:`~stableopt.spike.SpikeGuard`), escalating to an LR cut and a rollback.
        emergency_lr: cut the LR on non-finite values, explosions and repeated
            spikes, and recover it gradually (:class:`~stableopt.lr.EmergencyLR`).
        plateau: lower the LR when the training loss stops improving
            (:class:`~stableopt.lr.PlateauLR`; needs the loss).
        rollback: snapshots that undo a step which left non-finite weights
            (:class:`~stableopt.rollback.Rollback`; default every 100 good steps, in
            host memory: 3x the parameter bytes for Adam/AdamW). With ``None`` a
            step that corrupts the weights raises :class:`DivergenceError` at once.
        max_consecutive_failures: raise :class:`DivergenceError` after this many
            consecutive skipped or rolled-back steps (default 10, ``>= 1``).
        check_weights: when to check that the weights are finite. ``"lazy"``
            (default): only when a step's gradients or loss are non-finite (how a NaN
            weight shows itself at the next step) and before every snapshot, so a
            healthy step pays nothing and a snapshot never holds a corrupted state;
            a corrupting update is rolled back at the next step. ``"every_step"``:
            after every update (one foreach norm pass over the updated weights), so
            it is rolled back in the same step. ``"off"``: never.
        monitor: where counters and events are kept (default ``Monitor()``).

    The string ``"default"`` for a stage means its class built with its defaults.

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
        clip: ClipPolicy | float | str | None = "zscore",
        emergency_clip: EmergencyClip | Literal["default"] | None = "default",
        spike: SpikeGuard | Literal["default"] | None = "default",
        emergency_lr: EmergencyLR | Literal["default"] | None = "default",
        plateau: PlateauLR | Literal["default"] | None = "default",
        rollback: Rollback | Literal["default"] | None = "default",
        max_consecutive_failures: int = 10,
        check_weights: Literal["lazy", "every_step", "off"] = "lazy",
        monitor: Monitor | None = None,
    ) -> None:
        _check_optimizer(optimizer)
        check_choice("check_weights", check_weights, _WEIGHT_CHECKS)
        if monitor is not None and not isinstance(monitor, Monitor):
            raise TypeError(f"monitor must be a Monitor or None, got {type(monitor).__name__}")
        # Deliberately not Optimizer.__init__: it would build param_groups of its own,
        # and param_groups/state must stay the inner optimizer's objects.
        torch._C._log_api_usage_once("python.stableopt.SafeOptimizer")
        self.optimizer = optimizer
        self.clip = resolve_clip(clip)
        resolved_emergency_clip = _stage("emergency_clip", emergency_clip, EmergencyClip)
        self.emergency_clip = resolved_emergency_clip if self.clip is not None else None
        self.spike = _stage("spike", spike, SpikeGuard)
        self.emergency_lr = _stage("emergency_lr", emergency_lr, EmergencyLR)
        self.plateau = _stage("plateau", plateau, PlateauLR)
        self.rollback = _stage("rollback", rollback, Rollback)
        self.max_consecutive_failures = check_int(
            "max_consecutive_failures", max_consecutive_failures, minimum=1
        )
        self.check_weights = check_weights
        self.monitor = monitor if monitor is not None else Monitor()
        # The last step's numbers, as read to the host (no sync to report them).
        self._last_grad_norm: float | None = None
        self._last_threshold: float | None = None
        # Mutated, never rebound: wrappers that copy our __dict__ (Lightning's
        # LightningOptimizer) share this list, so observe_loss() through them reaches us.
        self._observed_losses: list[Tensor] = []
        self._last_loss: float | None = None
        self._spike_streak = 0
        self._said_no_loss = False
        # This step's bounds on the norm and the loss: name -> (signal, bound in its dtype).
        self._bounds: dict[str, tuple[str, float]] = {}
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

    def observe_loss(self, loss: Tensor | float) -> None:
        """Tell the optimizer this step's loss (no sync; several calls are averaged).

        The spike guard, the emergency LR policy and plateau scheduling read it at
        the next ``step()``. ``SafeLoss`` calls this for you; so does ``step(closure)``.
        """
        value = _scalar_loss(torch.as_tensor(loss))
        if self._observed_losses:
            value = value.to(self._observed_losses[0].device)
        self._observed_losses.append(value)

    # -- the pipeline ------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Run one guarded optimization step; return the closure's loss, if any.

        Raises:
            DivergenceError: past the failure budget; the weights are the last good ones.
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

        if self._decides_on_host(grads):
            return self._host_step(loss, grads, params)
        is_fused = self._takes_found_inf(len(params))
        amp_scale, amp_found_inf = self._amp_inputs(grads, is_fused)
        # The loss mean over ranks rides in the gradient norm's collective (one per step).
        stats = grad_stats(grads, amp_scale, loss=self._step_loss(loss))
        decision = self._clip_decision(stats, grads, params)
        flags = self._device_flags(stats, decision, amp_found_inf)
        numbers = self._numbers(stats, decision)
        coefficient = decision.coefficient if decision is not None else None
        if is_fused:
            # The skip rides in found_inf: the update runs before anything is read.
            self._run_inner(grads, flags["is_ok"], coefficient, is_fused, amp_scale)
            if self.check_weights == "every_step":
                flags["weights_ok"] = all_finite(params)
            host, values = self._read(flags, numbers)  # the step's one read
        else:
            host, values = self._read(flags, numbers)  # the step's one read, before the update
            if not host["is_ok"]:
                return self._end_step(loss, host, values, ran=False)
            if values.get("coefficient", 0.0) >= 1.0:
                coefficient = None  # known now: a multiply by 1.0 changes no bit
            self._run_inner(grads, None, coefficient, is_fused, amp_scale)
            if self.check_weights == "every_step":
                host |= self._read({"weights_ok": all_finite(params)}, {})[0]  # a second read
        return self._end_step(loss, host, values, ran=True)

    def _host_step(self, loss: Any, grads: list[Tensor], params: list[Tensor]) -> Any:
        """The step when every gradient is on the CPU: decided in floats (no kernel to decide)."""
        # Without found_inf the skip is a branch: the fused kernel's grad_scale still
        # carries the clip coefficient and GradScaler's scale.
        is_fused = bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))
        amp_scale, amp_found_inf = self._amp_inputs(grads, is_fused)
        stats = grad_stats(grads, amp_scale, loss=self._step_loss(loss))
        host, values, coefficient = self._host_verdict(stats, amp_found_inf)
        if not host["is_ok"]:
            return self._end_step(loss, host, values, ran=False)
        self._run_inner(grads, None, coefficient, is_fused, amp_scale)
        if self.check_weights == "every_step":
            host["weights_ok"] = bool(all_finite(params))
        return self._end_step(loss, host, values, ran=True)

    def _end_step(
        self, loss: Any, host: dict[str, bool], values: dict[str, float], ran: bool
    ) -> Any:
        if ran:
            self._observe(host, values)
        self._finish(host, values, ran=ran)
        self.monitor.end_step(self.stats)
        return loss

    @property
    def _step_supports_amp_scaling(self) -> bool:  # type: ignore[override]
        """True for a fused inner optimizer: GradScaler then hands us its scale (see ``step``).

        GradScaler sets ``grad_scale`` (its scale, or ``None`` after ``unscale_``) and
        ``found_inf`` on this object instead of unscaling and skipping itself; the
        step folds its scale into the fused kernel's ``grad_scale`` together with our
        clip coefficient, so the gradients are unscaled once, inside the kernel.
        """
        return bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))

    def _amp_inputs(
        self, grads: list[Tensor], is_fused: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        """GradScaler's ``grad_scale`` and ``found_inf`` for this step, if it set them.

        The scale can ride into the fused kernel only with a total-norm clip policy;
        otherwise (the first step of a fused optimizer, before it has state, or a
        unit-wise policy that clips in place) the gradients are unscaled here, once.
        """
        amp_scale: Tensor | None = self.__dict__.get("grad_scale")
        amp_found_inf: Tensor | None = self.__dict__.get("found_inf")
        if amp_scale is not None and (not is_fused or isinstance(self.clip, UnitwiseClip)):
            scale_(grads, amp_scale.double().reciprocal().float())
            amp_scale = None
        return amp_scale, amp_found_inf

    def _step_loss(self, closure_loss: Any) -> Tensor | None:
        """This rank's loss for the step (the closure's, else the mean of the observed ones)."""
        observed = list(self._observed_losses)
        self._observed_losses.clear()
        if isinstance(closure_loss, Tensor):
            return _scalar_loss(closure_loss)
        if observed:
            return observed[0] if len(observed) == 1 else torch.stack(observed).mean()
        if not self._said_no_loss and (
            self.plateau is not None or (self.spike and self.spike.watch_loss)
        ):
            log.info(
                "no loss seen: plateau scheduling and the loss-spike guard are inactive until "
                "step(closure), SafeLoss(optimizer=...) or opt.observe_loss(loss) provides one"
            )
            self._said_no_loss = True
        return None

    def _takes_found_inf(self, n_params_with_grad: int) -> bool:
        # Fused kernels skip the update when found_inf is set, but they create the
        # state of a parameter first; until every parameter has state, decide on the
        # host so that a bad first step leaves the state exactly as it was (empty).
        return bool(getattr(self.optimizer, "_step_supports_amp_scaling", False)) and (
            len(self.optimizer.state) >= n_params_with_grad
        )

    def _run_inner(
        self,
        grads: list[Tensor],
        is_ok: Tensor | None,
        coefficient: Tensor | None,
        is_fused: bool,
        amp_scale: Tensor | None,
    ) -> None:
        """The inner update, at our LR factor. ``is_ok`` (fused only): a device verdict
        for ``found_inf``; ``None`` when the host already decided the update runs."""
        with scaled_lr(self.param_groups, self.lr_factor, *self._lr_bounds()):
            if not is_fused:
                if coefficient is not None and grads:
                    scale_(grads, coefficient)
                self.optimizer.step()
            else:
                self._fused_step(is_ok, coefficient, amp_scale)

    def _fused_step(
        self, is_ok: Tensor | None, coefficient: Tensor | None, amp_scale: Tensor | None
    ) -> None:
        # GradScaler's protocol: the fused kernel divides every gradient by
        # grad_scale and leaves weights and state alone when found_inf is non-zero.
        # GradScaler's own scale and our clip coefficient compose into one divisor.
        inner: Any = self.optimizer
        if is_ok is not None:
            inner.found_inf = (~is_ok).to(torch.float32)
        if coefficient is not None:
            divisor = coefficient.to(torch.float32).reciprocal()
            inner.grad_scale = (
                divisor if amp_scale is None else amp_scale * divisor.to(amp_scale.device)
            )
        elif amp_scale is not None:
            inner.grad_scale = amp_scale
        try:
            self.optimizer.step()
        finally:
            for name in ("found_inf", "grad_scale"):
                if name in inner.__dict__:
                    delattr(inner, name)

    def _observe(self, host: dict[str, bool], values: dict[str, float]) -> None:
        """Histories take this step's numbers only if it was accepted (host values)."""
        if not host["is_ok"]:
            return
        grad_norm, loss = values["grad_norm"], values.get("loss")
        if self.clip is not None:
            self.clip.observe(grad_norm, True)
        if self.emergency_clip is not None:
            self.emergency_clip.observe(grad_norm, True)
        if self.spike is not None:
            self.spike.observe(loss, grad_norm, True)
        if self.plateau is not None and loss is not None:
            self.plateau.observe(loss, True)

    # -- what it did ----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters and the latest numbers of the run (host values: reading them never syncs).

        Keys: ``steps`` (calls to ``step()``), ``good_steps``, ``skipped_steps``,
        ``spike_skips``, ``rollbacks``, ``consecutive_failures``, ``total_clips``,
        ``emergency_clips``, ``lr_changes``, ``emergency_mode`` (an emergency LR cut
        is in force), ``lr_factor``, ``system_health`` (in [0, 1], see
        :class:`~stableopt.monitor.Monitor`), ``grad_norm`` (the last pre-clip total
        norm) and ``clip_threshold`` (the last max norm; ``None`` when clipping is off).
        """
        stats: dict[str, Any] = dict(self.monitor.counters)
        stats["emergency_mode"] = self.emergency_lr.in_emergency if self.emergency_lr else False
        stats["lr_factor"] = self.lr_factor
        stats["system_health"] = self.monitor.health
        stats["loss"] = self._last_loss
        stats["grad_norm"] = self._last_grad_norm
        stats["clip_threshold"] = self._last_threshold
        return stats

    def events(self) -> list[Event]:
        """The recent interventions, oldest first."""
        return self.monitor.events()

    def recommendations(self) -> list[Recommendation]:
        """Plain-language advice from the counters and events, with the numbers behind it."""
        return recommend.recommendations(self)

    # -- checkpoints ------------------------------------------------------------------

    def _stages(self) -> dict[str, Any]:
        return {
            "clip": self.clip,
            "emergency_clip": self.emergency_clip,
            "spike": self.spike,
            "emergency_lr": self.emergency_lr,
            "plateau": self.plateau,
            "rollback": self.rollback,
        }

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus a ``"stableopt"`` entry for every stage.

        The inner entries (``state``, ``param_groups``) stay at the top level, so
        tools that read an optimizer state dict keep working; ``"stableopt"`` holds
        the counters, events and every stage's state (clip history, cool-downs,
        spike windows, LR factors, plateau window, rollback bookkeeping).
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = dict(self.optimizer.state_dict())
        state_dict[checkpoint.STATE_KEY] = checkpoint.pack(
            self.optimizer,
            self._stages(),
            self.monitor,
            {
                "spike_streak": self._spike_streak,
                "last_grad_norm": self._last_grad_norm,
                "last_threshold": self._last_threshold,
            },
        )
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or a plain inner-optimizer one).

        Raises:
            ValueError: the state dict comes from a different setup (another inner
                optimizer class, a stage on in one and off in the other or of another
                class, different parameter groups).
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, dict(state_dict))
            if result is not None:
                state_dict = result
        if (
            not isinstance(state_dict, Mapping)
            or not {"state", "param_groups"} <= state_dict.keys()
        ):
            raise ValueError(
                "state_dict must be an optimizer state dict with 'state' and 'param_groups' entries"
            )
        ours = state_dict.get(checkpoint.STATE_KEY)
        if ours is not None:
            checkpoint.check_same_setup(ours, self.optimizer, self._stages())
        self.optimizer.load_state_dict(
            {k: v for k, v in state_dict.items() if k != checkpoint.STATE_KEY}
        )
        if ours is None:
            log.info(
                "state dict holds no stableopt entry (a plain optimizer checkpoint): counters start at 0"
            )
            self.monitor.load_state_dict(Monitor().state_dict())
            if self.rollback is not None:
                self.rollback.invalidate()
        else:
            checkpoint.load_stages(ours, self.optimizer, self._stages(), self.monitor)
            self._spike_streak = int(ours["spike_streak"])
            self._last_grad_norm = _optional_float(ours["last_grad_norm"])
            self._last_threshold = _optional_float(ours["last_threshold"])
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

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
        stages = "".join(f"    {name}={stage!r},\n" for name, stage in self._stages().items())
        return (
            f"{type(self).__name__}(\n{inner}\n{stages}"
            f"    max_consecutive_failures={self.max_consecutive_failures},\n"
            f"    check_weights={self.check_weights},\n)"
        )


def _check_optimizer(optimizer: Any) -> None:
    accepted = "a torch.optim.Optimizer instance, e.g. SafeOptimizer(torch.optim.AdamW(model.parameters()))"
    if isinstance(optimizer, SafeOptimizer):
        raise TypeError("optimizer is already a SafeOptimizer; wrap the inner optimizer once")
    if isinstance(optimizer, type):
        raise TypeError(f"optimizer must be {accepted}, got the class {optimizer.__name__}")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be {accepted}, got {type(optimizer).__name__}")


_Stage = TypeVar("_Stage")


def _stage(name: str, value: Any, cls: type[_Stage]) -> _Stage | None:
    """Resolve a stage argument: an instance, ``"default"`` (built with defaults) or ``None``."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, str) and value == "default":
        return cls()
    raise TypeError(f"{name} must be a {cls.__name__}, 'default' or None, got {value!r}")


def _scalar_loss(loss: Tensor) -> Tensor:
    """A loss as a detached 0-dim float32 tensor (its mean), with no kernel where none is needed."""
    value = loss.detach()
    if value.dtype != torch.float32:
        value = value.float()
    return value if value.dim() == 0 else value.mean()


def _optional_float(value: Any) -> float | None:
    """A number from a state dict (a float, or a 0-dim tensor in older ones), or ``None``."""
    return None if value is None else float(value)

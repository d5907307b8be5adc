"""SafeOptimizer: the step pipeline around any ``torch.optim.Optimizer``.

``step()`` reads top to bottom as the stages of the pipeline::

    loss     = closure()                     (under enable_grad, if given)
    stats    = grad_stats(grads)             one foreach pass: the total norm (and the loss mean)
    gate     : skip? clip coefficient?       stableopt.gate: read, then decide in floats;
                                             or, fused on an accelerator, on the device
    rerun    : a failing step's closure      stableopt.rerun: once more, RNG restored; healthy
               evaluated again                 then: a transient fault, its gradients are used
    inner.step()                             at our LR factor; the coefficient (and, on the
                                             device, the skip) ride in grad_scale / found_inf
    verify   : weights finite?               stableopt.weight_check
    respond  : histories, snapshot, counters, events, LR, escalation    stableopt.response
               (a failing step enters the ledger with its batch)      stableopt.ledger

Each stage is an object of :mod:`stableopt.stages` with its own state; the gate and
the response hold no state of a stage's. The step reads the device once: before the
update (the gradients' own device is the CPU, or the optimizer is not fused: its
update must wait for the verdict) or after it (a fused optimizer takes the skip in
``found_inf``). Events and ``stats()`` use the numbers already read.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from stableopt import _accelerate, checkpoint, recommend
from stableopt._checks import check_int
from stableopt.accounting import Accounting
from stableopt.buffers import ModelBuffers
from stableopt.escalation import Escalation
from stableopt.gate import Gate
from stableopt.grad_norms import GradStats, grad_stats, non_finite_params, partitioned
from stableopt.inner_update import InnerUpdate
from stableopt.ledger import Ledger
from stableopt.lr_control import LRControl
from stableopt.monitor import Event, Monitor
from stableopt.outcomes import SkipReason
from stableopt.partitions import Partitions
from stableopt.recommend import Recommendation
from stableopt.registry import resolve_clip, resolve_list, resolve_stage
from stableopt.rerun import Rerun
from stableopt.response import Response
from stableopt.restorer import Restorer
from stableopt.roles import LRPolicy, SkipRule
from stableopt.slots import Slots
from stableopt.stages.base import ClipPolicy, Stage
from stableopt.stages.emergency_clip import EmergencyClip
from stableopt.stages.emergency_lr import EmergencyLR
from stableopt.stages.hot_lr import HotLR
from stableopt.stages.plateau import PlateauLR
from stableopt.stages.rollback import Rollback
from stableopt.stages.spike import SpikeGuard
from stableopt.verdict import StepOutcome, StepVerdict
from stableopt.weight_check import WeightCheck

__all__ = ["SafeOptimizer"]

log = logging.getLogger(__name__)

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
    described in the module docstring. Every stage is an object with good
    defaults; pass your own to configure it, or ``None`` to turn it off.

    Args:
        optimizer: the optimizer to wrap (any ``torch.optim.Optimizer`` instance).
        clip: gradient clipping: a policy name (``"zscore"``: ZClip; ``"percentile"``:
            AutoClip; ``"agc"``: unit-wise AGC), a positive number (a fixed max norm,
            identical to ``torch.nn.utils.clip_grad_norm_``), a clip policy
            (:class:`~stableopt.stages.base.ClipPolicy`: any object with its members), or
            ``None`` (off). The default, ``"auto"``, is ``"outlier"``
            (:class:`~stableopt.stages.clip.OutlierClip`: only a norm that is an outlier of
            the run is clipped, back to its level; an ordinary step never is), except for an
            optimizer that sets its own step with a line search over full-batch gradients
            (``torch.optim.LBFGS``): no clip there. Why not ZClip (``"zscore"``) by
            default: on healthy recipes it clipped 5-16% of the steps of BatchNorm networks
            trained with SGD and ended up to 1.1% worse (``docs/benchmarks.md``).
        emergency_clip: on top of the clip policy, a total norm above 10x the median
            of the recent norms clips to half the policy's threshold (or of the emergency
            threshold, where the policy sets none) for a cool-down window
            (:class:`~stableopt.stages.emergency_clip.EmergencyClip`). Acts only when
            ``clip`` is set.
        spike: skip steps whose loss is an outlier against the run's own recent values,
            and clip a gradient norm that is one (skip it when ``clip`` is off)
            (:class:`~stableopt.stages.spike.SpikeGuard`). Off by default for LBFGS, whose
            full-batch gradient norm falls smoothly toward convergence, so an ordinary step
            reads as far above the recent level.
        emergency_lr: cut the LR when an update made the state bad (with a rollback),
            and recover it gradually (:class:`~stableopt.stages.emergency_lr.EmergencyLR`).
        hot_lr: cut the LR, with a rollback, when the loss climbs and stays far above where
            the run started: the LR is too hot (:class:`~stableopt.stages.hot_lr.HotLR`;
            needs the loss).
        plateau: lower the LR when the training loss stops improving
            (:class:`~stableopt.stages.plateau.PlateauLR`; needs the loss). Off by default
            (``None``): a healthy run whose loss flattens is not a fault, and on the
            do-no-harm benchmark the default PlateauLR lowered the LR in 8 of 25 healthy
            configurations, one ending 1.10x worse than plain X; ``"default"`` or an
            instance turns it on.
        rollback: snapshots that undo a step which left non-finite weights
            (:class:`~stableopt.stages.rollback.Rollback`; default every 100 good steps, in
            host memory: 3x the parameter bytes for Adam/AdamW). With ``None`` a
            step that corrupts the weights raises :class:`DivergenceError` at once.
        escalation: what a run of failed steps leads to: a new level after a few
            spikes at one level, a rollback with an LR cut when the state fails, a stop
            when the run cannot make progress (:class:`~stableopt.escalation.Escalation`;
            it cannot be turned off).
        max_consecutive_failures: raise :class:`DivergenceError` after this many
            consecutive skipped or rolled-back steps (default ``None``: the
            escalation's, 10; ``>= 1``).
        check_weights: when to check that the weights and the optimizer state are
            finite (:mod:`stableopt.weight_check`). ``"every_step"`` (default): after
            every update, one exact multi-tensor max-abs pass over the updated parameters
            and their state, so nothing non-finite ever leaves ``step()``. ``"params"``:
            the parameters only. ``"lazy"``: only when a step's gradients or loss are
            non-finite and before every snapshot (a corrupting update is undone at the
            next step). ``"off"``: never.
        rerun: with ``step(closure)``, a step about to be skipped for a non-finite or
            spiking loss or gradient runs the closure once more with the RNG state
            restored: healthy then, it was a transient fault (possible silent data
            corruption) and the step goes on with the second gradients; failing again, it
            is reproducible (the data or the state) and is skipped
            (:class:`~stableopt.rerun.Rerun`; ``None``: off). Healthy steps never re-run.
        ledger: the failing steps and the batches they came from (:meth:`tag_batch`), in
            ``state_dict`` and as JSON for a data loader (:class:`~stableopt.ledger.Ledger`;
            ``None``: off). A tagged batch that fails again is a data fault: skipped
            without counting as a failure of the run.
        skip_rules: rules of your own that skip a step whose gradient norm or loss is
            above a bound they set (:class:`~stableopt.roles.SkipRule`: ``name``,
            ``bound(signal)``, ``observe``, ``state_dict``, ``load_state_dict``), beside the
            spike guard; distinct names. Default none.
        lr_policies: LR multipliers of your own
            (:class:`~stableopt.roles.LRPolicy`: ``name``, ``factor``, ``min_lr``,
            ``observe``, ``state_dict``, ``load_state_dict``), multiplied with the built-in
            ones around the update; distinct names. Default none.
        monitor: where counters and events are kept (default ``Monitor()``).

    The string ``"default"`` for a stage means its class built with its defaults. A
    stage is checked by its members, not its class: your own object plugs in where it
    has the members of its slot's role (:mod:`stableopt.roles`; see
    ``docs/extending.md``).

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
        clip: ClipPolicy | float | str | None = "auto",
        emergency_clip: EmergencyClip | Literal["default"] | None = "default",
        spike: SpikeGuard | Literal["default"] | None = "default",
        emergency_lr: EmergencyLR | Literal["default"] | None = "default",
        hot_lr: HotLR | Literal["default"] | None = "default",
        plateau: PlateauLR | Literal["default"] | None = None,
        rollback: Rollback | Literal["default"] | None = "default",
        escalation: Escalation | Literal["default"] = "default",
        max_consecutive_failures: int | None = None,
        check_weights: Literal["every_step", "params", "lazy", "off"] = "every_step",
        rerun: Rerun | Literal["default"] | None = "default",
        ledger: Ledger | Literal["default"] | None = "default",
        skip_rules: Sequence[SkipRule] | None = None,
        lr_policies: Sequence[LRPolicy] | None = None,
        monitor: Monitor | None = None,
    ) -> None:
        _check_optimizer(optimizer)
        self.weight_check = WeightCheck(check_weights)
        if monitor is not None and not isinstance(monitor, Monitor):
            raise TypeError(f"monitor must be a Monitor or None, got {type(monitor).__name__}")
        # Deliberately not Optimizer.__init__: it would build param_groups of its own,
        # and param_groups/state must stay the inner optimizer's objects.
        torch._C._log_api_usage_once("python.stableopt.SafeOptimizer")
        self.optimizer = optimizer
        if escalation is None:
            raise TypeError("escalation must be an Escalation or 'default' (it cannot be off)")
        # a line-search optimizer over full-batch gradients is not judged like a noisy one
        line_search = isinstance(optimizer, torch.optim.LBFGS)
        if isinstance(clip, str) and clip == "auto":
            clip = None if line_search else "outlier"
        if line_search and isinstance(spike, str) and spike == "default":
            spike = None
        resolved_clip = resolve_clip(clip)
        resolved_emergency = resolve_stage("emergency_clip", emergency_clip, EmergencyClip)
        self.slots = Slots(
            escalation=resolve_stage("escalation", escalation, Escalation),
            clip=resolved_clip,
            emergency_clip=resolved_emergency if resolved_clip is not None else None,
            spike=resolve_stage("spike", spike, SpikeGuard),
            emergency_lr=resolve_stage("emergency_lr", emergency_lr, EmergencyLR),
            hot_lr=resolve_stage("hot_lr", hot_lr, HotLR),
            plateau=resolve_stage("plateau", plateau, PlateauLR),
            rollback=resolve_stage("rollback", rollback, Rollback),
            rerun=resolve_stage("rerun", rerun, Rerun),
            ledger=resolve_stage("ledger", ledger, Ledger),
            skip_rules=resolve_list("skip_rules", skip_rules),
            lr_policies=resolve_list("lr_policies", lr_policies),
        )
        if max_consecutive_failures is not None:
            self.slots.escalation.max_consecutive_failures = check_int(
                "max_consecutive_failures", max_consecutive_failures, minimum=1
            )
        self.monitor = monitor if monitor is not None else Monitor()
        #: The one writer of counters and events (:mod:`stableopt.accounting`); SafeLoss
        #: reports through it.
        self.accounting = Accounting(self.monitor)
        #: The model's buffers (BatchNorm statistics, ...): put back when a step does not
        #: update (:mod:`stableopt.buffers`); found from the code that builds the optimizer
        #: or the first forward pass.
        self.model_buffers = ModelBuffers()
        self.model_buffers.discover(p for group in optimizer.param_groups for p in group["params"])
        #: Whether the step sees ZeRO partitions (:mod:`stableopt.partitions`).
        self.partitions = Partitions(
            (p for group in optimizer.param_groups for p in group["params"]),
            len(optimizer.param_groups),
        )
        slots = self.slots
        self.gate = Gate(slots.clip, slots.emergency_clip, slots.spike, slots.skip_rules)
        self.inner = InnerUpdate(optimizer)
        self.lr_control = LRControl(
            slots.emergency_lr, slots.hot_lr, slots.plateau, slots.lr_policies
        )
        self.restorer = Restorer(optimizer, slots.rollback, self.model_buffers, slots.judging())
        self.response = Response(
            slots, self.accounting, self.restorer, self.lr_control, self.model_buffers, self.stats
        )
        underflow = eps_underflow(optimizer)
        if underflow:  # said now, and again if the run stops
            log.warning("%s", underflow)
            self.response.hint = underflow
        #: What the last step decided (host values; ``None`` before the first step).
        self.last_verdict: StepVerdict | None = None
        # Mutated, never rebound: wrappers that copy our __dict__ (Lightning's
        # LightningOptimizer) share this list, so observe_loss() through them reaches us.
        self._observed_losses: list[Tensor] = []
        self._said_no_loss = False
        self._loss_seen = True  # until a step comes without one
        self._is_verified = False  # the weights and state were checked before a first step
        self._init_hooks()

    @property
    def check_weights(self) -> str:
        """When the weights are checked: ``"every_step"``, ``"params"``, ``"lazy"`` or ``"off"``."""
        return self.weight_check.mode

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
        """Add a parameter group to the inner optimizer.

        The next ``step()`` checks every parameter: a NaN/Inf in one the snapshot holds (a
        corruption since) is restored from it, with an event, as between any two steps; one
        in the new group has no good state and raises ``ValueError``. A new snapshot of all
        the parameters follows.
        """
        self.optimizer.add_param_group(param_group)
        self._is_verified = False  # the next step checks the new group and takes a snapshot
        self.model_buffers.discover(self.param_groups[-1]["params"])
        self.partitions.add(self.param_groups[-1]["params"], len(self.param_groups))

    def watch(self, *modules: torch.nn.Module) -> None:
        """Put back the buffers of ``modules`` too when a step does not update.

        Not needed where the model is called as a module: the first forward pass tells
        which modules hold the optimizer's parameters (:mod:`stableopt.buffers`). Call it
        for a model used without a module call (``torch.func.functional_call``), or to add
        a module that holds none of the parameters but whose buffers the forward writes.

        Raises:
            TypeError: an argument is not a ``torch.nn.Module``.
        """
        self.model_buffers.watch(*modules)

    def observe_loss(self, loss: Tensor | float) -> None:
        """Tell the optimizer this step's loss (no sync; several calls are averaged).

        The spike guard, the emergency LR policy and plateau scheduling read it at
        the next ``step()``. ``SafeLoss`` calls this for you; so does ``step(closure)``.
        """
        value = _scalar_loss(torch.as_tensor(loss))
        if self._observed_losses:
            value = value.to(self._observed_losses[0].device)
        self._observed_losses.append(value)

    def tag_batch(self, ids: Any) -> None:
        """Name the coming step's batch for the ledger: its samples' ids (a sequence or a 1-D
        integer tensor of ints or strings) or one batch index. A failing step's ledger
        entry carries them; a tagged batch that fails again is a data fault. Applies to
        the next ``step()`` only.

        Raises:
            ValueError: the ledger is off (``SafeOptimizer(..., ledger=None)``).
            TypeError: ``ids`` is none of the above.
        """
        if self.ledger is None:
            raise ValueError("tag_batch needs the ledger, which ledger=None turned off")
        self.ledger.tag(ids)

    # -- the pipeline ------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Run one guarded optimization step; return the closure's loss, if any.

        Raises:
            DivergenceError: past the failure budget; the weights are the last good ones.
        """
        loss, rng = None, None
        if closure is not None:
            if self.rerun is not None:  # to evaluate the same batch again, if it fails
                rng = self.rerun.capture()
            with torch.enable_grad():
                loss = closure()
        step = self.accounting.begin_step()
        self.model_buffers.settle()
        zero = self.partitions.of_step(self.param_groups, self)
        if zero is not None and _clips_in_place(self.clip):
            raise ValueError(
                f"clip={self.clip!r} clips unit by unit, which cannot work under DeepSpeed ZeRO: "
                "the optimizer steps flat partitions of the parameters, not their rows. Use a "
                "total-norm clip ('auto', a number, 'zscore', 'percentile') with ZeRO"
            )
        try:
            if zero is None:
                return self._step(step, closure, loss, rng)
            with partitioned(zero.group):  # ZeRO: statistics over every rank's partition
                return self._step(step, closure, loss, rng)
        finally:
            # what a step leaves is what the next one puts back if it does not update
            self.model_buffers.keep()
            self.model_buffers.arm()

    def skipped_by_engine(self) -> None:
        """Count a step that DeepSpeed's ZeRO optimizer skipped before calling ``step()``
        (its overflow check found Inf/NaN in the gradients): one skipped step, told, with
        the step's loss, and the model's buffers put back. Called on every rank (the
        check is global), after the wrapper's ``step()`` returns (:mod:`stableopt.partitions`).
        """
        step = self.accounting.begin_step()
        self.model_buffers.settle()
        zero = self.partitions.found
        try:
            with partitioned(zero.group if zero is not None else None):
                stats = grad_stats([], None, loss=self._step_loss(None))
            loss = float(stats.loss) if stats.loss is not None else None
            verdict = StepVerdict(step, math.nan, loss, False, SkipReason.ENGINE_OVERFLOW)
            self.last_verdict = verdict
            tag = self.ledger.take_tag() if self.ledger is not None else None
            self.response.respond(verdict, weights_checked_after_updates=True, tag=tag)
            self.monitor.end_step(self.stats)
        finally:
            self.model_buffers.keep()
            self.model_buffers.arm()

    def _step(self, step: int, closure: Callable[[], Any] | None, loss: Any, rng: Any) -> Any:
        tag = self.ledger.take_tag() if self.ledger is not None else None
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        if self.lr_control.extra:  # policies that look at the schedule before the update
            scheduled = [float(group["lr"]) for group in self.param_groups]
            for change in self.lr_control.before_update(scheduled):
                self.accounting.lr_changed(change)
        if not self._is_verified:
            self._verify_start(step - 1)
        amp_scale, amp_found_inf = self.inner.amp_inputs(
            grads, self.__dict__, unscale_here=_clips_in_place(self.clip)
        )
        # The loss mean over ranks rides in the gradient norm's collective (one per step).
        stats = self._with_norm_stats(grad_stats(grads, amp_scale, loss=self._step_loss(loss)))
        clipped_in_place = self._clip_in_place(grads, params)
        if self._decides_before_update(grads):
            verdict, coefficient = self.gate.decide(step, stats, amp_found_inf, clipped_in_place)
            if self._may_rerun(rng, loss, amp_scale, verdict):
                verdict, coefficient, loss, params, grads = self._rerun(step, closure, rng, verdict)
            if verdict.is_accepted:
                self.inner.run(grads, coefficient, amp_scale, *self._lr(), _replay(closure, loss))
        else:  # fused, off the CPU: the skip rides in found_inf, the read comes after
            pending = self.gate.decide_on_device(stats, amp_found_inf, clipped_in_place)
            self.inner.run_fused(
                pending.is_ok, pending.coefficient, amp_scale, *self._lr(), _replay(closure, loss)
            )
            checked = self.weight_check.all_finite(self.optimizer, params)
            verdict = self.gate.read(step, pending, checked)
            if self._may_rerun(rng, loss, amp_scale, verdict):
                # the kernel skipped (state unchanged): the second evaluation decides here
                verdict, coefficient, loss, params, grads = self._rerun(step, closure, rng, verdict)
                if verdict.is_accepted:
                    self.inner.run(grads, coefficient, None, *self._lr(), _replay(closure, loss))
        verdict = self.weight_check.verify(
            verdict, self.optimizer, params, self._all_params(), self.response.is_snapshot_due()
        )
        if verdict.is_accepted and self.weight_check.mode != "off":
            bad_buffers = self.model_buffers.non_finite()  # measured before the update
            if bad_buffers:
                verdict = replace(verdict, bad_buffers=bad_buffers)
        self.last_verdict = verdict
        self.response.respond(
            verdict, weights_checked_after_updates=self.weight_check.after_every_update, tag=tag
        )
        self.monitor.end_step(self.stats)
        _accelerate.ensure_patched()
        return loss

    # -- the stages of step(), in order ---------------------------------------------

    def _verify_start(self, step: int) -> None:
        """Before the first step (and after ``add_param_group`` or ``load_state_dict``): the
        weights and the optimizer state must be finite, and are the first snapshot."""
        params = self._all_params()
        if self.rollback is not None and not self.restorer.has_snapshot:
            bad = self.response.take_snapshot(step)
        else:  # no snapshots, one loaded with a checkpoint (in_state_dict), or groups added
            bad = non_finite_params(self.optimizer, params)
            covered = self.restorer.snapshot_params if self.restorer.has_snapshot else 0
            if bad and max(bad) < covered:  # a corruption since the snapshot: restored
                self.response.restore_between_steps(bad)
                bad = ()
            bad = tuple(i for i in bad if i >= covered)
            if not bad and self.restorer.has_snapshot and covered < len(params):
                bad = self.response.take_snapshot(step)  # one that holds the new groups too
        if bad:
            raise ValueError(
                "the weights or the optimizer state are not finite before stableopt's first "
                f"step on them: {describe_params(self.param_groups, bad)}. Nothing good to "
                "start from: load finite weights (or a checkpoint) first"
            )
        self._is_verified = True

    def _may_rerun(self, rng: Any, loss: Any, amp_scale: Any, verdict: StepVerdict) -> bool:
        """A failing step whose closure computed the loss (not a do-nothing closure, as
        Lightning's manual optimization passes) and no GradScaler: it can be re-run."""
        return (
            rng is not None
            and isinstance(loss, Tensor)
            and amp_scale is None
            and self.rerun is not None
            and self.rerun.applies(verdict)
        )

    def _rerun(
        self, step: int, closure: Any, rng: Any, first: StepVerdict
    ) -> tuple[StepVerdict, Tensor | None, Any, list[Tensor], list[Tensor]]:
        """Evaluate the closure again on the same batch and RNG state; decide again."""
        assert self.rerun is not None
        self.rerun.restore(rng)
        self.model_buffers.put_back()  # the second forward starts where the first did
        for p in self._all_params():
            p.grad = None
        with torch.enable_grad():
            loss = closure()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        stats = self._with_norm_stats(grad_stats(grads, None, loss=self._step_loss(loss)))
        verdict, coefficient = self.gate.decide(
            step, stats, None, self._clip_in_place(grads, params)
        )
        devices = sorted({str(p.device) for p in params}) or ["cpu"]
        self.response.triaged(first, verdict, devices)
        return verdict, coefficient, loss, params, grads

    def _with_norm_stats(self, stats: GradStats) -> GradStats:
        """``stats`` with the growth of the normalisation layers' running statistics in this
        step's forward pass (judged by the spike guard: none without it); the buffers the
        forward wrote are read once here, for the check after the update too."""
        norm_stats = self.model_buffers.measure(judge_stats=self.spike is not None)
        return stats if norm_stats is None else replace(stats, norm_stats=norm_stats)

    def _step_loss(self, closure_loss: Any) -> Tensor | None:
        """This rank's loss for the step (the closure's, else the mean of the observed ones)."""
        observed = list(self._observed_losses)
        self._observed_losses.clear()
        if isinstance(closure_loss, Tensor):
            return _scalar_loss(closure_loss)
        if observed:
            self._loss_seen = True
            return observed[0] if len(observed) == 1 else torch.stack(observed).mean()
        self._loss_seen = False
        idle = self.inactive_stages()
        if idle and not self._said_no_loss:
            log.warning(
                "no loss seen at step %d: %s inactive. Pass the loss: SafeLoss(loss_fn, "
                "optimizer=opt), or opt.observe_loss(loss) before opt.step(), or "
                "opt.step(closure)",
                self.accounting.step,
                ", ".join(idle) + (" is" if len(idle) == 1 else " are"),
            )
            self._said_no_loss = True
        return None

    def inactive_stages(self) -> list[str]:
        """The stages that are on but idle for want of a loss (none was given to the last
        ``step()``): ``"spike (loss)"`` (the loss-spike guard), ``"hot_lr"``, ``"plateau"``."""
        if self._loss_seen:
            return []
        idle = []
        if self.spike is not None and self.spike.watches("loss"):
            idle.append("spike (loss)")
        if self.hot_lr is not None:
            idle.append("hot_lr")
        if self.plateau is not None:
            idle.append("plateau")
        return idle

    def _clip_in_place(self, grads: list[Tensor], params: list[Tensor]) -> Tensor | None:
        """A unit-wise policy rescales the gradients itself (before the verdict); its flag."""
        if not grads or self.clip is None or not _clips_in_place(self.clip):
            return None
        flag: Tensor = self.clip.clip_in_place(grads, params)  # type: ignore[attr-defined]
        return flag

    #: Decide before the update when reading costs nothing (CPU gradients). The tests
    #: turn it off to run the device path of fused optimizers on CPU tensors.
    _cpu_reads_decide = True

    def _decides_before_update(self, grads: list[Tensor]) -> bool:
        """Read first and decide on the host, unless a fused optimizer can take the verdict
        on the device (its kernel reads ``found_inf``) and reading would be a sync."""
        # Fused kernels skip the update when found_inf is set, but they create the
        # state of a parameter first; until every parameter has state, decide on the
        # host so that a bad first step leaves the state exactly as it was (empty).
        if not self.inner.is_fused or len(self.optimizer.state) < len(grads):
            return True
        return self._cpu_reads_decide and all(
            type(g) is Tensor and g.device.type == "cpu" for g in grads
        )

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _lr(self) -> tuple[float, tuple[float, float | None]]:
        return self.lr_control.factor, self.lr_control.bounds()

    @property
    def _step_supports_amp_scaling(self) -> bool:  # type: ignore[override]
        """True for a fused inner optimizer: GradScaler then hands us its scale (see ``step``).

        GradScaler sets ``grad_scale`` (its scale, or ``None`` after ``unscale_``) and
        ``found_inf`` on this object instead of unscaling and skipping itself; the
        fused kernel then unscales the gradients once, inside it.
        """
        return self.inner.is_fused

    # -- what it did ----------------------------------------------------------------

    @property
    def last_step(self) -> StepOutcome | None:
        """What the last ``step()`` did in the end (``None`` before the first): the update
        kept, skipped, rolled back or the run stopped; why; the clip coefficient; our LR
        factor. Host values: reading it never syncs.

        A step that GradScaler skips on its own (a non-fused optimizer under
        ``torch.amp.GradScaler``) never calls ``step()``, so it does not show here; a fused
        one hands us GradScaler's ``found_inf`` and does (``status="skipped"``).
        """
        return self.response.last_outcome

    @property
    def step_was_skipped(self) -> bool:
        """Whether the last ``step()`` left its update out of the weights (skipped, rolled
        back or stopped): the name accelerate uses. Under ``accelerator.prepare``,
        ``accelerator.optimizer_step_was_skipped`` reads it, so the Hugging Face Trainer
        does not step its LR scheduler after such a step (as after GradScaler's own skip)."""
        outcome = self.response.last_outcome
        return outcome is not None and outcome.was_skipped

    @property
    def lr_factor(self) -> float:
        """Our current LR multiplier: emergency x hot-LR x plateau factor, times those of
        ``lr_policies`` (1.0 = none)."""
        return self.lr_control.factor

    def effective_lr(self) -> list[Any]:
        """The LR each group's update uses: the scheduled ``group["lr"]`` times our factor.

        ``group["lr"]`` itself always shows the scheduled LR (what your scheduler wrote).
        """
        return [self.lr_control.effective_lr(group["lr"]) for group in self.param_groups]

    def stats(self) -> dict[str, Any]:
        """Counters and the latest numbers of the run (host values: reading them never syncs).

        Keys: ``steps`` (calls to ``step()``), ``good_steps``, ``skipped_steps``,
        ``spike_skips``, ``scaler_skips``, ``rollbacks``, ``consecutive_failures``,
        ``total_clips``, ``emergency_clips``, ``lr_changes``, ``transient_faults`` (failing
        steps whose re-run was healthy, see ``rerun``) and ``transient_faults_by_device``
        (``{"cuda:0": 1}``), ``data_faults`` (tagged batches that failed again, see
        ``ledger``), ``emergency_mode`` (an
        emergency LR cut is in force), ``lr_factor``, ``system_health`` (in [0, 1], see
        :class:`~stableopt.monitor.Monitor`), ``loss`` (the last step's), ``grad_norm``
        (the last pre-clip total norm) and ``clip_threshold`` (the norm above which a step
        is clipped now: the lowest of the policy's own level, the spike guard's bound and
        the emergency threshold, or the last step's max norm where it clipped lower;
        ``inf`` while none applies, ``None`` when clipping is off), ``clip_rate`` (``total_clips`` over ``good_steps``),
        ``inactive_stages`` (the stages idle for want of a loss: :meth:`inactive_stages`).
        """
        stats: dict[str, Any] = dict(self.monitor.counters)
        stats["emergency_mode"] = self.emergency_lr.in_emergency if self.emergency_lr else False
        stats["lr_factor"] = self.lr_factor
        stats["system_health"] = self.monitor.health
        stats["transient_faults_by_device"] = dict(self.rerun.by_device) if self.rerun else {}
        last = self.last_verdict
        stats["loss"] = last.loss if last is not None else None
        stats["grad_norm"] = last.grad_norm if last is not None else None
        stats["clip_threshold"] = self._clip_threshold()
        good = stats.get("good_steps", 0)
        stats["clip_rate"] = stats.get("total_clips", 0) / good if good else 0.0
        stats["inactive_stages"] = self.inactive_stages()
        return stats

    def _clip_threshold(self) -> float | None:
        """The norm above which a step is clipped now (:meth:`Gate.clips_above`), or the last
        step's max norm where that was lower (it clipped); ``None`` when clipping is off."""
        now = self.gate.clips_above()
        last = self.last_verdict
        if now is None or last is None or last.clip_threshold is None:
            return now
        return min(now, last.clip_threshold)

    def events(self) -> list[Event]:
        """The recent interventions, oldest first."""
        return self.monitor.events()

    def recommendations(self, **thresholds: Any) -> list[Recommendation]:
        """Plain-language advice from the counters and events, with the numbers behind it.

        ``thresholds`` are those of :func:`stableopt.recommend.recommend` (e.g.
        ``min_lr_cuts=1``). Reads ``stats()``, the events and every group's scheduled LR.
        """
        lrs = [float(group["lr"]) for group in self.param_groups]
        return recommend.recommend(self.stats(), self.events(), lrs, **thresholds)

    # -- checkpoints ------------------------------------------------------------------

    def _stages(self) -> dict[str, Stage | None]:
        return self.slots.named()

    # the stages, by slot (``None``: off): the objects the pipeline uses
    clip = property(lambda self: self.slots.clip, doc="The clip policy (``None``: off).")
    emergency_clip = property(lambda self: self.slots.emergency_clip, doc="The emergency clip.")
    spike = property(lambda self: self.slots.spike, doc="The spike guard (``None``: off).")
    emergency_lr = property(lambda self: self.slots.emergency_lr, doc="The emergency LR policy.")
    hot_lr = property(lambda self: self.slots.hot_lr, doc="The hot-LR watch (``None``: off).")
    plateau = property(lambda self: self.slots.plateau, doc="The plateau LR policy.")
    rollback = property(lambda self: self.slots.rollback, doc="The rollback (``None``: off).")
    escalation = property(lambda self: self.slots.escalation, doc="The escalation.")
    rerun = property(lambda self: self.slots.rerun, doc="The rerun triage (``None``: off).")
    ledger = property(lambda self: self.slots.ledger, doc="The ledger (``None``: off).")
    skip_rules = property(lambda self: list(self.slots.skip_rules), doc="Your skip rules.")
    lr_policies = property(lambda self: list(self.slots.lr_policies), doc="Your LR policies.")

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
        last = self.last_verdict
        stages = self._stages()
        state_dict[checkpoint.STATE_KEY] = checkpoint.pack(
            self.optimizer,
            stages,
            self.monitor,
            {
                "last_grad_norm": last.grad_norm if last is not None else None,
                "last_loss": last.loss if last is not None else None,
                "last_threshold": last.clip_threshold if last is not None else None,
            },
        )
        ours = state_dict[checkpoint.STATE_KEY]
        with_snapshot = "params" in (ours["stages"].get("rollback") or {})
        ours["restorer"] = self.restorer.state_dict(with_snapshot)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or a plain inner-optimizer one).

        Everything is validated before anything is loaded, so a refused state dict leaves
        the wrapper and the inner optimizer exactly as they were.

        Raises:
            ValueError: the state dict comes from a different setup (another inner
                optimizer class, a stage on in one and off in the other or of another
                class, different parameter groups, a state tensor shaped unlike its
                parameter: the message names the group, index and shape) or holds a NaN/Inf
                in the optimizer state.
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
        # Validate everything, then commit: a refused load changes nothing.
        if ours is not None:
            checkpoint.check_same_setup(ours, self.optimizer, self._stages())
        checkpoint.check_inner_state(state_dict, self.optimizer)
        if ours is not None:
            checkpoint.check_stages(ours, self._stages(), self.monitor)
        self.optimizer.load_state_dict(
            {k: v for k, v in state_dict.items() if k != checkpoint.STATE_KEY}
        )
        self._is_verified = False  # the weights are checked (and snapshotted) at the next step
        if ours is None:
            log.info(
                "state dict holds no stableopt entry (a plain optimizer checkpoint): counters start at 0"
            )
            self.monitor.load_state_dict(Monitor().state_dict())
            self.restorer.invalidate()
        else:
            checkpoint.load_stages(ours, self._stages(), self.monitor)
            # the judging histories at the snapshot: saved beside it (older checkpoints kept
            # them in the rollback's entry)
            rollback_state = ours["stages"].get("rollback") or {}
            self.restorer.load_state_dict(
                ours.get("restorer") or {"stage_states": rollback_state.get("stage_states", {})}
            )
            self.last_verdict = checkpoint.last_verdict(ours, self.monitor.counters["steps"])
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
        self.model_buffers.discover(self._all_params())

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        stages = "".join(f"    {name}={stage!r},\n" for name, stage in self._stages().items())
        idle = self.inactive_stages()
        inactive = f"    inactive (no loss seen)={idle},\n" if idle else ""
        return (
            f"{type(self).__name__}(\n{inner}\n{stages}    check_weights={self.check_weights},\n"
            f"{inactive})"
        )


def _check_optimizer(optimizer: Any) -> None:
    accepted = "a torch.optim.Optimizer instance, e.g. SafeOptimizer(torch.optim.AdamW(model.parameters()))"
    if isinstance(optimizer, SafeOptimizer):
        raise TypeError("optimizer is already a SafeOptimizer; wrap the inner optimizer once")
    if isinstance(optimizer, type):
        raise TypeError(f"optimizer must be {accepted}, got the class {optimizer.__name__}")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be {accepted}, got {type(optimizer).__name__}")


def eps_underflow(optimizer: Optimizer) -> str:
    """Why an Adam-family ``eps`` will write NaN into low-precision weights, or ``""``.

    An ``eps`` that rounds to 0 in the parameters' dtype (1e-8 in float16, whose smallest
    positive value is about 6e-8) leaves ``0 / (sqrt(0) + 0)`` for every entry whose
    gradient was zero so far: the first step writes NaN, as plain torch does.
    """
    for g, group in enumerate(optimizer.param_groups):
        eps = group.get("eps")
        if not isinstance(eps, (int, float)) or eps <= 0:
            continue
        for dtype in {p.dtype for p in group["params"] if p.is_floating_point()}:
            if dtype in (torch.float32, torch.float64) or torch.tensor(eps, dtype=dtype) != 0:
                continue
            tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
            return (
                f"eps={eps:g} of parameter group {g} is 0 in {str(dtype).replace('torch.', '')} "
                f"(its smallest positive value is about {tiny:.1g}): an update of an entry "
                "whose gradient has been zero divides 0 by 0 and writes NaN. Use an eps the "
                f"dtype holds (>= {tiny:.1g}; 1e-4 is common for float16), or keep float32 "
                "master weights (torch.amp autocast with float32 parameters)"
            )
    return ""


def _replay(closure: Callable[[], Any] | None, loss: Any) -> Callable[[], Any] | None:
    """The closure for the inner optimizer: its first call returns the evaluation ``step``
    already made (the gradients are that evaluation's), later ones evaluate again (LBFGS)."""
    if closure is None:
        return None
    calls = 0

    def replay() -> Any:
        nonlocal calls
        calls += 1
        return loss if calls == 1 else closure()

    return replay


def describe_params(param_groups: list[dict[str, Any]], indices: tuple[int, ...]) -> str:
    """``group g, index i, shape (...)`` for each of ``indices`` (in param_groups order)."""
    where = [
        (g, i, tuple(p.shape))
        for g, group in enumerate(param_groups)
        for i, p in enumerate(group["params"])
    ]
    shown = [f"group {g} index {i} shape {shape}" for g, i, shape in (where[k] for k in indices)]
    more = f" and {len(indices) - 5} more" if len(indices) > 5 else ""
    return "; ".join(shown[:5]) + more


def _clips_in_place(clip: Any) -> bool:
    return bool(getattr(clip, "clips_in_place", False))


def _scalar_loss(loss: Tensor) -> Tensor:
    """A loss as a detached 0-dim float32 tensor (its mean), with no kernel where none is needed."""
    value = loss.detach()
    if value.dtype != torch.float32:
        value = value.float()
    return value if value.dim() == 0 else value.mean()


def find_safe_optimizer(optimizer: Any) -> SafeOptimizer | None:
    """The :class:`~stableopt.SafeOptimizer` inside ``optimizer``, or ``None``.

    Follows wrappers down to the real object: accelerate's ``AcceleratedOptimizer``
    (``.optimizer``) and Lightning's ``LightningOptimizer`` (``._optimizer``). The
    latter is itself an instance of the class it wraps (Lightning builds a subclass
    of it), so it is unwrapped before the ``isinstance`` test: methods that set
    attributes, called on the wrapper, would set them on the wrapper only.
    """
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        wrapped = optimizer.__dict__.get("_optimizer") if hasattr(optimizer, "__dict__") else None
        if isinstance(wrapped, Optimizer):
            optimizer = wrapped
            continue
        if isinstance(optimizer, SafeOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None

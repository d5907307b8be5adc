"""The model's buffers: what a step that does not update must put back besides the weights.

A forward pass writes into a model before the optimizer has a say: BatchNorm's
``running_mean``, ``running_var`` and ``num_batches_tracked``, the running statistics of
other normalisation layers, EMA or teacher copies updated in ``forward``, usage counters.
A batch whose loss is NaN has already written NaN there by the time ``step()`` skips it.
:class:`ModelBuffers` keeps the buffers as they were before the step's first forward pass
and puts them back when the step's update does not run, so the model equals one that
never saw the batch.

**Which modules.** No argument is needed: the outermost modules holding a parameter of the
optimizer are the *roots*, found in the code that builds the optimizer (the ``model`` it
holds) or else in the first forward pass (:mod:`stableopt._discovery`); every buffer under
a root is watched. Where neither finds one (a functional model, raw tensors) the first
``step()`` says so once at WARNING; :meth:`ModelBuffers.watch` (``opt.watch(model)``)
names the modules instead.

**A batch far outside the data.** A batch x1e6 gives a BatchNorm model an ordinary loss
and ordinary gradients (each layer normalises it) while its running variance jumps 1e11x:
the model in ``eval()`` is ruined and nothing else shows it. :meth:`ModelBuffers.measure`
measures it (:meth:`ModelBuffers.measure`): for each normalisation layer with running statistics, the sum of its running
variance after the forward pass over the sum before, against what a batch of
:data:`NORM_STATS_RATIO` times the running variance would give with the layer's momentum
``m``, :math:`(1 - m) + m R`. Above 1, the step is a spike of the running statistics
(skipped, like a loss spike, while the spike guard is on; judged from the
:data:`NORM_STATS_WARMUP`-th step on).

**When they are kept.** Just before the first forward pass of a root after a ``step()``
(a forward pre-hook on each root) and at the end of every ``step()``, so the kept values
are those before the step's first forward pass, even when the model was changed between
steps (a checkpoint loaded, a layer re-initialised). Buffers of at most
:data:`SMALL_BUFFER` elements (BatchNorm's statistics: one number per channel) are copied
each time: a BatchNorm kernel updates its running statistics in place without bumping
their version counter, so whether they changed cannot be seen without reading them.
Larger buffers (causal masks, rotary tables, position ids) are copied once, and again
only when their version counter says they were written or they were replaced by another
tensor; a mask that never changes is never copied again. Copies and checks are
multi-tensor kernels over all the buffers at once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from stableopt._discovery import discovery_hook, modules_in_frames
from stableopt.grad_norms import _norms_in_order, finite_flags, replicated

__all__ = [
    "NORM_STATS_RATIO",
    "NORM_STATS_WARMUP",
    "SMALL_BUFFER",
    "ModelBuffers",
    "WatchedBuffer",
]

log = logging.getLogger(__name__)

#: Buffers of at most this many elements are copied every time the buffers are kept (see
#: the module docstring); larger ones when their version counter or identity changes.
SMALL_BUFFER = 1 << 16

#: A batch whose variance in a normalisation layer (summed over its channels) is this many
#: times the layer's running variance is far outside the data: inputs 30x too large (an
#: unnormalised shard, a x1e6 batch). The loss and the gradients of such a batch look
#: ordinary, since the layer normalises it away; only the running statistics show it.
NORM_STATS_RATIO = 1000.0
#: Steps before running statistics are judged: they start as placeholders (mean 0, var 1)
#: and need a few batches to reach the activations' own scale (0.9**20 = 0.12 of the
#: placeholder left with BatchNorm's default momentum).
NORM_STATS_WARMUP = 20

_LARGE = 1e30  # an infinite growth, as a finite number a bound is crossed by


@dataclass
class WatchedBuffer:
    """One buffer under a root module, and what was kept of it.

    Attributes:
        module: the module that registers it.
        name: its name in ``module._buffers``.
        path: its module's dotted path under the root (``"postnet.3"``; the root's class
            name for a buffer of the root itself).
        kind: what the module is, in words (``"BatchNorm running statistics"``).
        kept: its value before the step's first forward pass (``None`` until kept).
        kept_of: the tensor object ``kept`` was taken from.
        version: that tensor's version counter when it was kept.
    """

    module: nn.Module
    name: str
    path: str
    kind: str
    kept: Tensor | None = None
    kept_of: Tensor | None = None
    version: int = -1
    is_small: bool = True

    @property
    def live(self) -> Tensor | None:
        """The buffer the module holds now (``None``: removed)."""
        value = self.module._buffers.get(self.name)
        return value if isinstance(value, Tensor) else None

    def has_moved(self) -> bool:
        """Whether the buffer may differ from what was kept (always for a small buffer)."""
        live = self.module._buffers.get(self.name)
        if live is None:
            return False
        return self.is_small or live is not self.kept_of or live._version != self.version


class ModelBuffers:
    """Keep the buffers of the optimizer's modules, and put them back (see the module
    docstring). Built by :class:`~stableopt.SafeOptimizer`; ``opt.watch(model)`` reaches
    :meth:`watch`."""

    def __init__(self) -> None:
        self.roots: list[nn.Module] = []
        self.buffers: list[WatchedBuffer] = []
        self._param_ids: set[int] = set()
        self._checked: set[int] = set()  # modules the discovery hook has looked at
        self._discovery: RemovableHandle | None = None
        self._root_hooks: list[RemovableHandle] = []
        self._armed: set[int] = set()  # roots whose next forward keeps the buffers first
        self._by_root: list[list[WatchedBuffer]] = []
        self._said_blind = False
        self._norms: list[tuple[nn.Module, WatchedBuffer]] = []  # running_var of norm layers
        self.steps_seen = 0  # steps since the roots changed (the warm-up of the statistics)
        self._accept_next = False  # a new level of the statistics was accepted
        # the step's measure: the indices of the floating buffers it read, their finite flags
        self._measured: tuple[list[int], Tensor] | None = None

    # -- which modules -------------------------------------------------------------------

    def discover(self, params: Iterable[Tensor], *, frames: int = 12) -> None:
        """Find the modules holding ``params`` (:mod:`stableopt._discovery`): among what the
        calling code holds, else in the next forward passes (until :meth:`settle`)."""
        ids = {id(p) for p in params}
        self._param_ids |= ids
        missing = ids - {id(p) for root in self.roots for p in root.parameters()}
        if not missing:
            return
        for module in modules_in_frames(missing, frames):
            self._add_root(module)
            self.keep(self.roots.index(module))
            missing -= {id(p) for p in module.parameters()}
        if missing and self._discovery is None:
            self._discovery = discovery_hook(self, ModelBuffers._seen)

    def watch(self, *modules: nn.Module) -> None:
        """Watch every buffer of ``modules`` (and of their submodules) from now on."""
        for module in modules:
            if not isinstance(module, nn.Module):
                raise TypeError(
                    f"watch() takes torch.nn.Module instances, got {type(module).__name__}"
                )
            self._add_root(module)
            self.keep(self.roots.index(module))

    def settle(self) -> None:
        """At a ``step()``: stop looking once a root is known; say once if none is."""
        if self._discovery is not None and self.roots:
            self._discovery.remove()
            self._discovery = None
        if not self.roots and not self._said_blind:
            self._said_blind = True
            log.warning(
                "no module holding the optimizer's parameters was found (none in the code "
                "that built it, none called before this step()): a skipped step cannot put "
                "back the model's buffers (BatchNorm running statistics and the like). If "
                "the model has buffers, call opt.watch(model) once"
            )

    def _seen(self, module: nn.Module) -> None:
        """The discovery hook: the first call of each module, outermost first."""
        if id(module) in self._checked:
            return
        holds_ours = any(id(p) in self._param_ids for p in module.parameters())
        self._checked |= {id(m) for m in module.modules()}
        if holds_ours:
            self._add_root(module)
            self.keep(self.roots.index(module))

    def _add_root(self, root: nn.Module) -> None:
        if any(root is r for r in self.roots):
            return
        inside = {id(m) for m in root.modules()}
        self.roots = [r for r in self.roots if id(r) not in inside] + [root]
        self._checked |= inside
        for handle in self._root_hooks:
            handle.remove()
        self._root_hooks = [
            r.register_forward_pre_hook(_keep_hook(self, i)) for i, r in enumerate(self.roots)
        ]
        previous = {(id(b.module), b.name): b for b in self.buffers}
        self.buffers = []
        seen: set[int] = set()
        for root_module in self.roots:
            top = type(root_module).__name__
            for path, module in root_module.named_modules():
                for name, value in module._buffers.items():
                    if not isinstance(value, Tensor) or id(value) in seen:
                        continue
                    seen.add(id(value))
                    watched = previous.get((id(module), name)) or WatchedBuffer(
                        module, name, path or top, _kind(module, name)
                    )
                    self.buffers.append(watched)
        self._norms = [
            (w.module, w)
            for w in self.buffers
            if w.name == "running_var" and isinstance(w.module, nn.modules.batchnorm._NormBase)
        ]
        self.steps_seen = 0
        mine = [{id(m) for m in r.modules()} for r in self.roots]
        self._by_root = [[w for w in self.buffers if id(w.module) in ids] for ids in mine]
        self._armed = set()

    # -- keeping and putting back --------------------------------------------------------

    @torch.inference_mode(False)
    @torch.no_grad()
    def keep(self, root: int | None = None) -> None:
        """Keep the current values (of every buffer, or of root ``root``'s) that may have
        changed since they were last kept: one multi-tensor copy (the copies are ordinary
        tensors even when the forward pass that keeps them runs under
        ``torch.inference_mode()``, as an evaluation does)."""
        if root is not None:
            self._armed.discard(root)
        self._measured = None
        kept: list[Tensor] = []
        lives: list[Tensor] = []
        for watched in self.buffers if root is None else self._by_root[root]:
            live = watched.module._buffers.get(watched.name)
            if live is None:
                continue
            copy = watched.kept
            if live is not watched.kept_of:  # new, or replaced by another tensor
                if copy is None or (copy.shape, copy.dtype, copy.device) != (
                    live.shape,
                    live.dtype,
                    live.device,
                ):
                    watched.kept = live.detach().clone()
                    _mark(watched, live)
                    continue
            elif not watched.is_small and live._version == watched.version:
                continue
            assert copy is not None
            kept.append(copy)
            lives.append(live.detach() if live.requires_grad else live)
            _mark(watched, live)
        if kept:
            torch._foreach_copy_(kept, lives)

    def arm(self) -> None:
        """After a ``step()``: keep each root's buffers again just before its next forward."""
        self._armed = set(range(len(self.roots)))
        self.steps_seen += 1

    def measure(self, judge_stats: bool = True) -> Tensor | None:
        """Read the floating buffers that may have changed since they were kept (one
        multi-tensor L1 pass, no host read): their finite flags, for :meth:`non_finite`,
        and, with ``judge_stats``, the running statistics' spike measure of this step
        (see the module docstring): a 0-dim tensor, the largest over the normalisation
        layers of the growth of their summed running variance over its bound (above 1: a
        batch far outside the data; a NaN counts as 0, it is told apart as non-finite), or
        ``None`` when no layer is judged (none, warming up, or a new level just taken)."""
        chosen: list[int] = []
        lives: list[Tensor] = []
        for i, watched in enumerate(self.buffers):
            live = watched.module._buffers.get(watched.name)
            if live is not None and _is_float(live) and watched.has_moved():
                chosen.append(i)
                lives.append(live.detach())
        if not lives:
            self._measured = None
            return None
        sums = torch.stack(_norms_in_order(lives, 1.0))
        self._measured = (chosen, torch.isfinite(sums))
        judge = judge_stats and not self._accept_next
        self._accept_next = False
        if not judge or self.steps_seen < NORM_STATS_WARMUP or not self._norms:
            return None
        position = {index: k for k, index in enumerate(chosen)}
        where, kepts, bounds = [], [], []
        for k, (module, watched) in enumerate(self._norms):
            index = self._norm_index[k]
            if index in position and watched.kept is not None:
                where.append(position[index])
                kepts.append(watched.kept)
                momentum = getattr(module, "momentum", None)
                m = float(momentum) if momentum is not None else 1.0 / (self.steps_seen + 1)
                bounds.append((1.0 - m) + m * NORM_STATS_RATIO)
        if not kepts:
            return None
        before = torch.stack(_norms_in_order(kepts, 1.0))
        growth = sums[torch.tensor(where, device=sums.device)].to(before.dtype) / before.clamp_min(
            torch.finfo(before.dtype).tiny
        )
        limits = torch.tensor(bounds, dtype=growth.dtype, device=growth.device)
        return torch.nan_to_num(growth / limits, nan=0.0, posinf=_LARGE).max()

    @property
    def _norm_index(self) -> list[int]:
        index = {id(w): i for i, w in enumerate(self.buffers)}
        return [index[id(w)] for _, w in self._norms]

    def norm_stats_detail(self) -> tuple[str, float]:
        """The normalisation layer whose running variance grew the most since the buffers
        were kept, and by how much (reads: for a message)."""
        worst, path = 1.0, ""
        for _, watched in self._norms:
            live, kept = watched.live, watched.kept
            if live is None or kept is None or live.shape != kept.shape:
                continue
            growth = float(live.double().sum() / kept.double().sum())
            if growth > worst or not path:
                worst, path = growth, watched.path
        return path, worst

    def accept_level(self) -> None:
        """The escalation took a run of spikes as the new level: let the next batch's
        statistics in, so the running ones move to it."""
        self._accept_next = True

    def non_finite(self) -> tuple[int, ...]:
        """Indices of the buffers holding a NaN or Inf, among those :meth:`measure` read
        this step (one read of its flags; an exact check of any it flags, since a sum of
        large values can overflow)."""
        if self._measured is None:
            return ()
        chosen, flags = self._measured
        if bool(flags.all()):
            return ()
        suspects = [chosen[k] for k in (~flags).nonzero().flatten().tolist()]
        lives = [self.buffers[i].live for i in suspects]
        with replicated():  # a rank's own buffers: no collective, whatever the step's
            exact = finite_flags([t for t in lives if t is not None])
        return tuple(i for i, ok in zip(suspects, exact.tolist()) if not ok)

    @torch.inference_mode(False)
    @torch.no_grad()
    def put_back(self, indices: Iterable[int] | None = None) -> tuple[int, ...]:
        """Put the kept values back (into every buffer that may have moved, or into
        ``indices``); return the indices of those that held a NaN or Inf (as measured)."""
        bad = self.non_finite()
        wanted = None if indices is None else set(indices)
        kept: list[Tensor] = []
        lives: list[Tensor] = []
        for i, watched in enumerate(self.buffers):
            if wanted is not None and i not in wanted:
                continue
            live = watched.module._buffers.get(watched.name)
            if live is None or watched.kept is None or not watched.has_moved():
                continue
            if (live.shape, live.dtype, live.device) == (
                watched.kept.shape,
                watched.kept.dtype,
                watched.kept.device,
            ):
                kept.append(watched.kept)
                lives.append(live.detach() if live.requires_grad else live)
            else:  # replaced by a tensor of another shape: the kept one goes back
                watched.module._buffers[watched.name] = watched.kept.clone()
        if lives:
            torch._foreach_copy_(lives, kept)
        for watched in self.buffers:  # what is there now is what was kept
            live = watched.module._buffers.get(watched.name)
            if live is not None and watched.kept is not None:
                _mark(watched, live)
        self._measured = None
        return bad if wanted is None else tuple(i for i in bad if i in wanted)

    def after_step(
        self, kept_update: bool, bad_on_accept: tuple[int, ...]
    ) -> tuple[tuple[int, ...], bool]:
        """After a step: put back every buffer that may have moved when the step's update did
        not stand (``kept_update`` false), else the buffers its forward left non-finite
        (``bad_on_accept``); the buffers that held a NaN/Inf, and whether the step was
        skipped."""
        if kept_update:
            if bad_on_accept:
                self.put_back(bad_on_accept)
            return bad_on_accept, False
        return self.put_back(), True

    # -- for snapshots and messages ------------------------------------------------------

    def tensors(self) -> list[Tensor]:
        """The live buffers, in watch order (what a snapshot copies)."""
        return [live for w in self.buffers if (live := w.live) is not None]

    def describe(self, indices: Iterable[int]) -> str:
        """``the BatchNorm running statistics of `postnet.3` and 2 more module(s)``."""
        by_module: dict[str, str] = {}
        for i in indices:
            watched = self.buffers[i]
            by_module.setdefault(watched.path, watched.kind)
        if not by_module:
            return "no buffer"
        (path, kind), *rest = by_module.items()
        more = f" and {len(rest)} more module(s)" if rest else ""
        return f"the {kind} of `{path}`{more}"

    def modules_of(self, indices: Iterable[int]) -> list[str]:
        """The module paths of ``indices``, each once."""
        return list(dict.fromkeys(self.buffers[i].path for i in indices))

    def __getstate__(self) -> dict[str, Any]:
        # hooks and modules do not travel with a pickled optimizer: it looks again
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]


def _mark(watched: WatchedBuffer, live: Tensor) -> None:
    watched.kept_of = live
    watched.version = live._version
    watched.is_small = live.numel() <= SMALL_BUFFER


def _is_float(tensor: Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()


def _kind(module: nn.Module, name: str) -> str:
    """What a buffer is, in words, for messages."""
    if isinstance(module, nn.modules.batchnorm._NormBase):
        norm = type(module).__name__.rstrip("123d").replace("Sync", "")
        return f"{norm or 'normalisation'} running statistics"
    return f"buffer `{name}` ({type(module).__name__})"


def _keep_hook(owner: ModelBuffers, root: int) -> Any:
    import weakref

    ref = weakref.ref(owner)

    def hook(module: nn.Module, args: Any) -> None:
        # inside a compiled region (``model.compile()``) nothing is kept here, so nothing
        # breaks the graph: the copy taken at the end of the last step() stands
        if torch.compiler.is_compiling():
            return
        buffers = ref()
        if buffers is not None and root in buffers._armed:
            buffers.keep(root)

    return hook

"""The bad-batch ledger: every step that was skipped, rolled back or stopped, with its batch.

``opt.tag_batch(ids)`` before ``opt.step()`` names the step's batch (the ids of its samples,
or a batch index); a failing step's entry carries them. The ledger is part of
``state_dict()``, bounded in memory, and exports as JSON for a data loader to skip those
samples on resume (:meth:`Ledger.to_json`; the format below). A tagged batch that fails a
second time, with other weights in between (after a rollback, or on a resumed run that
feeds it again), is a *data fault*: the data reproduces the failure whatever the state, so
it is skipped without counting as a failure of the run (no rollback, no LR cut, no step
towards ``DivergenceError``), and a ``data_fault`` event names the ids.

The JSON format (``"format": "stableopt.ledger/1"``)::

    {
      "format": "stableopt.ledger/1",
      "entries": [
        {"step": 4, "status": "skipped", "cause": "nonfinite_grads",
         "reason": "the loss is NaN/Inf ...", "grad_norm": null, "loss": null,
         "ids": [17, 230, 5, 81]}
      ],
      "bad_ids": [5, 17, 81, 230]
    }

``status`` is ``"skipped"``, ``"rolled_back"`` or ``"stopped"``; ``cause`` is the value of the
step's :class:`~stableopt.outcomes.SkipReason` or :class:`~stableopt.outcomes.Cause` (absent
from ledgers written before it was kept); numbers that are not finite are ``null``; ``ids`` is ``null`` for an untagged step; ``bad_ids`` is every id of every
entry, sorted (ints before strings).
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from stableopt._checks import check_int
from stableopt.outcomes import AnyCause, parse_cause
from stableopt.stages.base import StepNumbers

__all__ = ["FORMAT", "Ledger", "LedgerEntry"]

FORMAT = "stableopt.ledger/1"

Id = int | str


@dataclass(frozen=True)
class LedgerEntry:
    """One failing step.

    Attributes:
        step: the number of the step (``1`` for the first ``step()`` call).
        status: ``"skipped"``, ``"rolled_back"`` or ``"stopped"``.
        reason: why, in words (the event's reason), for people.
        grad_norm: the total gradient norm before clipping (``None`` if not finite).
        loss: the step's loss (``None`` if not finite or not given).
        ids: the batch's tag (:meth:`Ledger.tag`), or ``None``.
        cause: why, as data: the step's :class:`~stableopt.outcomes.SkipReason` or
            :class:`~stableopt.outcomes.Cause` (``None``: not known).
    """

    step: int
    status: str
    reason: str
    grad_norm: float | None
    loss: float | None
    ids: tuple[Id, ...] | None
    cause: AnyCause | None = None


class Ledger:
    """The failing steps of the run and the batches they came from.

    Args:
        max_entries: entries kept, the oldest dropped first (default 10000, ``>= 1``);
            the ids of dropped entries are still known bad.
        max_ids: distinct bad ids kept (default 100000, ``>= 1``); past it the oldest
            are forgotten.
    """

    name = "ledger"

    def __init__(self, max_entries: int = 10_000, max_ids: int = 100_000) -> None:
        self.max_entries = check_int("max_entries", max_entries, minimum=1)
        self.max_ids = check_int("max_ids", max_ids, minimum=1)
        self.entries: deque[LedgerEntry] = deque(maxlen=self.max_entries)
        self._bad: dict[Id, None] = {}  # insertion-ordered set of the ids of failing steps
        self._bad_tags: dict[tuple[Id, ...], None] = {}
        self._tag: tuple[Id, ...] | None = None

    # -- the step's tag -----------------------------------------------------------------

    def tag(self, ids: Any) -> None:
        """Name the coming step's batch: sample ids (a sequence or a 1-D tensor of ints or
        strings) or one batch index. It applies to the next ``step()`` only."""
        self._tag = _as_ids(ids)

    def take_tag(self) -> tuple[Id, ...] | None:
        """The coming step's tag, cleared (``step()`` takes it once)."""
        tag, self._tag = self._tag, None
        return tag

    def is_known_bad(self, tag: tuple[Id, ...] | None) -> bool:
        """Whether this exact batch failed before."""
        return tag is not None and tag in self._bad_tags

    # -- recording ----------------------------------------------------------------------

    def record(
        self,
        step: int,
        status: str,
        reason: str,
        grad_norm: float | None,
        loss: float | None,
        tag: tuple[Id, ...] | None,
        cause: AnyCause | None = None,
    ) -> LedgerEntry:
        """Add a failing step."""
        entry = LedgerEntry(step, status, reason, _finite(grad_norm), _finite(loss), tag, cause)
        self.entries.append(entry)
        if tag is not None:
            self._bad_tags[tag] = None
            for i in tag:
                self._bad.pop(i, None)
                self._bad[i] = None
            while len(self._bad) > self.max_ids:
                del self._bad[next(iter(self._bad))]
            while len(self._bad_tags) > self.max_entries:
                del self._bad_tags[next(iter(self._bad_tags))]
        return entry

    def first_failure(self, tag: tuple[Id, ...] | None) -> int | None:
        """The step at which the batch ``tag`` first failed (of the entries kept), or ``None``."""
        return next((e.step for e in self.entries if tag is not None and e.ids == tag), None)

    def bad_ids(self) -> list[Id]:
        """Every id of every failing step, sorted (ints before strings)."""
        return sorted(self._bad, key=lambda i: (isinstance(i, str), i))  # type: ignore[no-any-return]

    # -- export -------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The ledger as JSON data (the format in the module docstring)."""
        return {
            "format": FORMAT,
            "entries": [
                {
                    **asdict(e),
                    "ids": None if e.ids is None else list(e.ids),
                    "cause": None if e.cause is None else e.cause.value,
                }
                for e in self.entries
            ],
            "bad_ids": self.bad_ids(),
        }

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path``; return it."""
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    # -- the stage protocol -------------------------------------------------------------

    def observe(self, numbers: StepNumbers) -> None:
        """Nothing to take: the response records failing steps through :meth:`record`."""

    def state_dict(self) -> dict[str, Any]:
        """Entries, the bad ids and tags, as plain data."""
        data = self.to_json()
        data["bad_tags"] = [list(t) for t in self._bad_tags]
        data["bad_ids"] = list(self._bad)  # in insertion order (which to forget first)
        return data

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state_dict.get("format") != FORMAT:
            raise ValueError(f"state_dict of Ledger must have format {FORMAT!r}")
        self.entries = deque(
            (
                LedgerEntry(
                    int(e["step"]),
                    str(e["status"]),
                    str(e["reason"]),
                    e["grad_norm"],
                    e["loss"],
                    None if e["ids"] is None else tuple(e["ids"]),
                    parse_cause(e.get("cause")),
                )
                for e in state_dict["entries"]
            ),
            maxlen=self.max_entries,
        )
        self._bad = dict.fromkeys(state_dict["bad_ids"])
        self._bad_tags = dict.fromkeys(tuple(t) for t in state_dict["bad_tags"])
        self._tag = None

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"Ledger(max_entries={self.max_entries}, max_ids={self.max_ids})"


def _as_ids(ids: Any) -> tuple[Id, ...]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() > 1 or ids.is_floating_point() or ids.is_complex():
            raise TypeError(
                "tag_batch takes ids as a 0-D or 1-D integer tensor, a sequence of ints or "
                f"strings, or one int or string; got a {ids.dim()}-D {ids.dtype} tensor"
            )
        return tuple(int(i) for i in ids.reshape(-1).tolist())
    if isinstance(ids, (int, str)) and not isinstance(ids, bool):
        return (ids,)
    if isinstance(ids, Iterable) and not isinstance(ids, (bytes, Mapping)):
        out: list[Id] = []
        for i in ids:
            if isinstance(i, torch.Tensor) and i.dim() == 0 and not i.is_floating_point():
                i = int(i)
            if isinstance(i, bool) or not isinstance(i, (int, str)):
                raise TypeError(
                    "tag_batch takes ids as ints or strings (a sequence, a 1-D integer tensor "
                    f"or one of them); got an element of type {type(i).__name__}"
                )
            out.append(i)
        return tuple(out)
    raise TypeError(
        "tag_batch takes ids as a sequence of ints or strings, a 1-D integer tensor, or one "
        f"int or string; got {type(ids).__name__}"
    )


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None

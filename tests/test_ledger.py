"""The bad-batch ledger: failing steps with their batches, a data fault when a tagged batch
fails again, JSON a sampler reads, and the ledger through a save and a resume in a new
process."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from stableopt import DivergenceError, Ledger, SafeOptimizer
from stableopt.ledger import FORMAT
from stableopt.outcomes import SkipReason

ROOT = Path(__file__).resolve().parents[1]
BAD = 17  # the poisoned sample


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="stableopt")


class Samples(Dataset[tuple[int, torch.Tensor, torch.Tensor]]):
    """64 regression samples; sample 17's input holds a NaN. Items carry their index."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 4, generator=g)
        self.y = self.x.sum(1, keepdim=True)
        self.x[BAD, 0] = math.nan

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        return i, self.x[i], self.y[i]


class SkipLogged(Sampler[int]):
    """The sampler of docs/when-a-step-goes-wrong.md: leaves out the ledger's bad ids."""

    def __init__(self, base: Sampler[int], ledger_json: str | Path) -> None:
        self.base = base
        self.bad = set(json.loads(Path(ledger_json).read_text())["bad_ids"])

    def __iter__(self) -> Any:
        return (i for i in self.base if i not in self.bad)

    def __len__(self) -> int:
        return sum(1 for i in self.base if i not in self.bad)


def train_epoch(model: nn.Module, opt: SafeOptimizer, loader: DataLoader[Any]) -> None:
    for ids, x, y in loader:
        opt.tag_batch(ids)  # the batch's sample ids: a failing step's entry carries them
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.observe_loss(loss)
        opt.step()


def setup() -> tuple[nn.Module, SafeOptimizer, DataLoader[Any]]:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    loader = DataLoader(Samples(), batch_size=8, shuffle=False)
    return model, opt, loader


def test_a_failing_step_is_recorded_with_its_batch_and_numbers() -> None:
    model, opt, loader = setup()
    train_epoch(model, opt, loader)
    assert opt.ledger is not None
    (entry,) = opt.ledger.entries
    assert entry.step == 3 and entry.status == "skipped"  # batch 3 holds samples 16..23
    assert entry.ids == tuple(range(16, 24)) and BAD in entry.ids
    assert entry.grad_norm is None and entry.loss is None  # NaN: not finite, null in JSON
    assert entry.cause is SkipReason.NONFINITE_GRADS
    data = opt.ledger.to_json()
    assert data["entries"][0]["cause"] == "nonfinite_grads"
    assert data["format"] == FORMAT and data["bad_ids"] == list(range(16, 24))
    assert json.loads(json.dumps(data)) == data  # plain JSON
    assert data["entries"][0]["ids"] == list(range(16, 24))


def test_the_same_batch_failing_again_is_a_data_fault_not_a_failure_of_the_run() -> None:
    model, opt, loader = setup()
    train_epoch(model, opt, loader)
    train_epoch(model, opt, loader)  # the second epoch feeds batch 3 again
    stats = opt.stats()
    assert stats["skipped_steps"] == 2 and stats["data_faults"] == 1
    assert stats["rollbacks"] == 0 and stats["lr_factor"] == 1.0
    (fault,) = [e for e in opt.events() if e.kind == "data_fault"]
    assert fault.step == 8 + 3
    assert fault.labels["batch"] == "16, 17, 18, 19, 20, 21, 22, 23"
    assert fault.data["first_step"] == 3 and fault.cause is SkipReason.NONFINITE_GRADS
    advice = {r.kind: r for r in opt.recommendations()}
    assert "[16, 17, 18, 19, 20, 21, 22, 23]" in advice["data_fault"].message


def test_a_batch_retried_until_it_would_diverge_is_skipped_as_data() -> None:
    """A loop that feeds one bad batch again and again: untagged, the failures add up to a
    rollback and then DivergenceError; tagged, only the first counts."""
    x = torch.randn(8, 4)
    x[0, 0] = math.nan
    y = torch.zeros(8, 1)

    def retry(tag: bool) -> SafeOptimizer:
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
        for _ in range(30):
            if tag:
                opt.tag_batch(7)  # a batch index
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return opt

    with pytest.raises(DivergenceError):
        retry(tag=False)
    opt = retry(tag=True)
    assert opt.stats()["data_faults"] == 29 and opt.stats()["rollbacks"] == 0
    assert opt.stats()["consecutive_failures"] == 1


def test_bad_tags_and_a_ledger_that_is_off_say_what_is_accepted() -> None:
    opt = SafeOptimizer(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))
    for bad in (1.5, [1, None], torch.ones(2, 2, dtype=torch.long), torch.ones(3)):
        with pytest.raises(TypeError, match="tag_batch takes ids"):
            opt.tag_batch(bad)
    off = SafeOptimizer(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), ledger=None)
    with pytest.raises(ValueError, match="ledger=None"):
        off.tag_batch([1, 2])
    with pytest.raises(ValueError, match="max_entries"):
        Ledger(max_entries=0)


def test_the_ledger_is_bounded_and_keeps_the_ids_of_dropped_entries() -> None:
    ledger = Ledger(max_entries=3)
    for step in range(1, 6):
        ledger.record(step, "skipped", "why", math.nan, 1.0, (step * 10,))
    assert [e.step for e in ledger.entries] == [3, 4, 5]
    assert ledger.bad_ids() == [10, 20, 30, 40, 50]  # ids outlive their entries
    assert not ledger.is_known_bad((10,)) and ledger.is_known_bad((50,))
    small = Ledger(max_ids=2)
    small.record(1, "skipped", "why", 1.0, 1.0, (1, 2, 3))
    assert small.bad_ids() == [2, 3]  # the oldest forgotten first


def test_the_ledger_survives_a_save_and_a_resume_in_a_new_process(tmp_path: Path) -> None:
    model, opt, loader = setup()
    train_epoch(model, opt, loader)
    assert opt.ledger is not None
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    opt.ledger.save(tmp_path / "ledger.json")
    script = textwrap.dedent(
        f"""
        import json, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from torch import nn
        from torch.utils.data import DataLoader, SequentialSampler
        from stableopt import SafeOptimizer
        from tests.test_ledger import Samples, SkipLogged, train_epoch
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
        ckpt = torch.load({str(tmp_path / "ckpt.pt")!r}, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        data = Samples()
        sampler = SkipLogged(SequentialSampler(data), {str(tmp_path / "ledger.json")!r})
        seen = [i for i in sampler]
        train_epoch(model, opt, DataLoader(data, batch_size=8, sampler=sampler))
        print(json.dumps({{"entries": opt.ledger.to_json()["entries"], "seen": seen,
                           "skipped": opt.stats()["skipped_steps"], "steps": opt.stats()["steps"]}}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT
    )
    resumed = json.loads(out.stdout.strip().splitlines()[-1])
    assert resumed["entries"] == opt.ledger.to_json()["entries"]  # the ledger came along
    assert not set(resumed["seen"]) & set(range(16, 24)) and len(resumed["seen"]) == 56
    assert resumed["steps"] == 8 + 7 and resumed["skipped"] == 1  # the old skip, no new one

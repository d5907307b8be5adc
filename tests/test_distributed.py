"""Real torch.distributed runs: 2 spawned gloo ranks on CPU (DDP and FSDP2).

The ranks run the workers in tests/_dist_workers.py and write their results to
files in ``tmp_path``; every assertion is made here, in the parent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests import _dist_workers as workers

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo"),
]


def _same_tensors(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _same_stats(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key] or (a[key] != a[key] and b[key] != b[key]), key


# -- DDP ----------------------------------------------------------------------------------


def test_ddp_ranks_stay_identical_through_a_nan_batch_and_a_loss_spike(tmp_path: Path) -> None:
    rank0, rank1 = workers.launch("ddp_faults", tmp_path)
    for label in ("defaults", "clip1"):
        r0, r1 = rank0[label], rank1[label]
        assert _same_tensors(r0["params"], r1["params"]), label
        for s0, s1 in zip(r0["state"], r1["state"]):
            assert s0.keys() == s1.keys()
            assert all(torch.equal(s0[k], s1[k]) for k in s0), label
        _same_stats(r0["stats"], r1["stats"])
        stats = r0["stats"]
        assert stats["steps"] == workers.DDP_STEPS
        # The NaN batch of rank 0 and the spike of rank 1 were skipped on both ranks.
        skips = [step for step, kind in stats["events"] if kind == "skip"]
        assert workers.NAN_STEP + 1 in skips, (label, stats["events"])
        assert workers.SPIKE_STEP + 1 in skips, (label, stats["events"])
        assert stats["skipped_steps"] >= 2
        assert stats["lr_changes"] >= 1  # the NaN cut the LR on both ranks alike
        assert all(torch.isfinite(p).all() for p in r0["params"])
        # Under DDP the step's only collective is the loss mean.
        assert all(c == {"all_reduce": 1} for c in r0["collectives"]), label


# -- FSDP2 --------------------------------------------------------------------------------


def test_fsdp2_grad_norm_and_flags_are_global(tmp_path: Path) -> None:
    rank0, rank1 = workers.launch("fsdp_norm", tmp_path)
    for r in (rank0, rank1):
        assert r["is_plain"]  # a plain tensor, not a Partial DTensor
        assert r["is_finite"] and r["weights_ok"]
        torch.testing.assert_close(r["norm"], r["ref_norm"], rtol=1e-6, atol=0)
        torch.testing.assert_close(r["norm"], r["torch_norm"], rtol=1e-6, atol=0)
        assert r["collectives"] == {"all_reduce": 1}
        assert not r["nan_is_finite"]  # NaN in rank 1's shard: non-finite on every rank
        assert not r["weights_after_nan"]  # all_finite is an AND across ranks
    assert torch.equal(rank0["norm"], rank1["norm"])


def test_fsdp2_skips_and_rollbacks_happen_on_all_ranks_together(tmp_path: Path) -> None:
    rank0, rank1 = workers.launch("fsdp_faults", tmp_path)
    for label in rank0:
        r0, r1 = rank0[label], rank1[label]
        _same_stats(r0["stats"], r1["stats"])
        assert _same_tensors(r0["params"], r1["params"]), label
        assert r0["finite"], label
        assert r0["stats"]["steps"] == 45
    events = {label: rank0[label]["stats"]["events"] for label in rank0}
    assert (workers.GRAD_NAN_STEP + 1, "skip") in events["grad_nan"]
    assert rank0["grad_nan"]["stats"]["skipped_steps"] == 1
    assert rank0["grad_nan"]["stats"]["rollbacks"] == 0
    # every_step: the corrupted update is rolled back in the same step ...
    assert (workers.WEIGHT_NAN_STEP + 1, "rollback") in events["weight_nan_every_step"]
    # ... lazy: at the next step, when the NaN shows in the (global) loss and grads.
    assert (workers.WEIGHT_NAN_STEP + 2, "rollback") in events["weight_nan_lazy"]
    for label in ("weight_nan_every_step", "weight_nan_lazy"):
        assert rank0[label]["stats"]["rollbacks"] == 1, events[label]
    # Healthy FSDP2 step: one all-reduce for the grad norm, one for the loss mean,
    # one for the every_step weight check.
    healthy = rank0["healthy_every_step"]["collectives"]
    assert all(c == {"all_reduce": 3} for c in healthy), healthy
    lazy = rank0["grad_nan"]["collectives"]
    assert sum(c == {"all_reduce": 2} for c in lazy) >= 40, lazy


def test_fsdp2_checkpoint_recipe_resumes_exactly(tmp_path: Path) -> None:
    rank0, rank1 = workers.launch("fsdp_checkpoint", tmp_path)
    for r in (rank0, rank1):
        assert r["stats_at_load"]["skipped_steps"] == 1
        assert r["stats_at_load"]["steps"] == 15
        assert _same_tensors(r["expected"], r["resumed"])
        _same_stats(r["expected_stats"], r["resumed_stats"])
    _same_stats(rank0["resumed_stats"], rank1["resumed_stats"])

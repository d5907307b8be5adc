"""Real torch.distributed runs: 2 spawned gloo ranks on CPU (DDP and FSDP2).

The ranks run the workers in tests/_dist_workers.py (one launch for every DDP
scenario, one for every FSDP2 scenario, shared by the tests below through
module-scoped fixtures) and write their results to files; every assertion is made
here, in the parent. "Identical" means bit for bit: ``torch.equal`` and ``==``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests import _dist_workers as workers

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo"),
]

ALL_REDUCE = "c10d.allreduce_"


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return workers.launch("ddp", tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return workers.launch("fsdp", tmp_path_factory.mktemp("fsdp"))


def _same_tensors(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _same_stats(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key] or (a[key] != a[key] and b[key] != b[key]), key


def _skip_steps(stats: dict[str, Any]) -> list[int]:
    return [step for step, kind in stats["events"] if kind == "skip"]


# -- DDP ----------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["ddp", "fsdp"])
def test_a_nan_batch_on_one_rank_leaves_every_ranks_batchnorm_as_if_never_seen(
    which: str, request: pytest.FixtureRequest
) -> None:
    """Rank 0's batch holds a NaN: both ranks skip, and each rank's BatchNorm statistics
    and weights equal those of a run in which that step never happened."""
    ranks = request.getfixturevalue(which)
    for result in ranks:
        seen, never = result["bn"], result["bn_never"]
        assert seen["skipped"] == 1 and never["skipped"] == 0
        assert seen["eval_finite"]
        assert _same_tensors(seen["buffers"], never["buffers"])
        assert _same_tensors(seen["params"], never["params"])


@pytest.mark.parametrize("label", ["defaults", "clip1", "plateau"])
def test_ddp_ranks_decide_alike_and_stay_bit_identical(ddp: Any, label: str) -> None:
    r0, r1 = ddp[0][label], ddp[1][label]
    assert r0["flags"] == r1["flags"]  # every host read, every step: the same decisions
    assert _same_tensors(r0["params"], r1["params"])
    for s0, s1 in zip(r0["state"], r1["state"]):
        assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
    _same_stats(r0["stats"], r1["stats"])  # counters, LR factors, effective LRs, events
    assert all(torch.isfinite(p).all() for p in r0["params"])
    # The ranks saw different data: their own losses differ.
    assert any(float(a) != float(b) for a, b in zip(r0["local_losses"], r1["local_losses"]))


@pytest.mark.parametrize("label", ["defaults", "clip1"])
def test_ddp_nan_batch_on_one_rank_and_spike_on_another_skip_on_both(ddp: Any, label: str) -> None:
    stats = ddp[0][label]["stats"]
    assert stats["steps"] == workers.DDP_STEPS
    # Steps are counted from 1: loop step s is optimizer step s + 1.
    assert workers.NAN_STEP + 1 in _skip_steps(stats), stats["events"]
    assert workers.SPIKE_STEP + 1 in _skip_steps(stats), stats["events"]
    assert stats["skipped_steps"] == 2
    # An isolated bad batch is skipped without an LR cut, on both ranks alike.
    assert not any(kind == "lr_cut" for _, kind in stats["events"]), stats["events"]
    # Rank 1's spike alone raised the mean loss: both ranks flagged a loss spike.
    assert sum(read.get("loss_spike", False) for read in ddp[0][label]["flags"]) == 1


@pytest.mark.parametrize("label", ["defaults", "clip1", "plateau"])
def test_ddp_loss_the_optimizer_decides_on_is_the_mean_over_ranks(ddp: Any, label: str) -> None:
    last0, last1 = ddp[0][label]["local_losses"][-1], ddp[1][label]["local_losses"][-1]
    assert last0 != last1
    expected = float((last0.float() + last1.float()) / 2)
    assert ddp[0][label]["stats"]["loss"] == expected == ddp[1][label]["stats"]["loss"]


def test_ddp_plateau_reads_the_mean_loss(ddp: Any) -> None:
    # Rank 0 fits noise, rank 1 a signal; the plateau policy sees their mean and
    # both ranks lower the LR at the same steps (identity: the test above).
    stats = ddp[0]["plateau"]["stats"]
    assert [kind for _, kind in stats["events"]].count("plateau") >= 1, stats["events"]
    assert stats["lr_factor"] < 1.0


@pytest.mark.parametrize("label", ["defaults", "clip1", "plateau"])
def test_ddp_step_communicates_only_the_loss_mean(ddp: Any, label: str) -> None:
    counted = [c for c in ddp[0][label]["collectives"] if c]
    assert len(counted) >= 10
    # One all-reduce of the loss per step (the loss was observed every step); the
    # gradients arrive all-reduced by DDP, so nothing else: no weight or flag check.
    assert all(c == {ALL_REDUCE: 1} for c in counted), counted


# -- FSDP2 --------------------------------------------------------------------------------


def test_fsdp2_grad_norm_loss_and_finite_flags_are_global(fsdp: Any) -> None:
    r0, r1 = fsdp[0]["norm"], fsdp[1]["norm"]
    for r in (r0, r1):
        assert r["is_plain"]  # a plain tensor, not a Partial DTensor
        # Bit-identical to clip_grad_norm_'s total norm made whole (full_tensor()) ...
        assert torch.equal(r["norm"], r["torch_norm"])
        # ... and equal to the norm of an unsharded copy of the model on the full batch.
        torch.testing.assert_close(r["norm"], r["ref_norm"], rtol=1e-6, atol=0)
        assert r["is_finite"] and r["weights_ok"]
        # The loss mean rides in the norm's all-reduce: one collective in all.
        assert r["stats_comms"] == {ALL_REDUCE: 1}
        assert r["weight_comms"] == {ALL_REDUCE: 1}
        assert not r["nan_is_finite"]  # NaN in rank 1's gradient shard: non-finite on both
        assert not r["weights_after_nan"]  # NaN in rank 1's weight shard: an AND over ranks
    assert torch.equal(r0["norm"], r1["norm"])
    assert r0["local_loss"] != r1["local_loss"]
    expected = (r0["local_loss"] + r1["local_loss"]) / 2
    assert torch.equal(r0["loss_mean"], expected) and torch.equal(r1["loss_mean"], expected)


@pytest.mark.parametrize("label", ["clip", "clip_fused", "agc"])
def test_fsdp2_training_matches_the_unsharded_model(fsdp: Any, label: str) -> None:
    r0, r1 = fsdp[0]["transparency"][label], fsdp[1]["transparency"][label]
    assert _same_tensors(r0["params"], r1["params"])
    _same_stats(r0["stats"], r1["stats"])
    assert r0["stats"]["good_steps"] == workers.TRANSPARENCY_STEPS
    assert r0["stats"]["total_clips"] == workers.TRANSPARENCY_STEPS  # the clip acted
    # Sharded vs unsharded differ only in the order of float sums (reduce-scatter).
    for ours, ref in zip(r0["params"], r0["ref_params"]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("label", [case[0] for case in workers.FAULT_CASES])
def test_fsdp2_ranks_decide_alike_and_stay_identical(fsdp: Any, label: str) -> None:
    r0, r1 = fsdp[0]["faults"][label], fsdp[1]["faults"][label]
    assert r0["flags"] == r1["flags"]
    _same_stats(r0["stats"], r1["stats"])
    assert _same_tensors(r0["params"], r1["params"])
    assert all(torch.isfinite(p).all() for p in r0["params"])
    assert r0["stats"]["steps"] == workers.FAULT_STEPS


@pytest.mark.parametrize("label", ["grad_nan", "grad_nan_clip1_fused"])
def test_fsdp2_nan_in_one_ranks_gradient_shard_skips_on_all_ranks(fsdp: Any, label: str) -> None:
    stats = fsdp[0]["faults"][label]["stats"]
    assert _skip_steps(stats) == [workers.GRAD_NAN_STEP + 1]
    assert stats["skipped_steps"] == 1 and stats["rollbacks"] == 0


def test_fsdp2_nan_in_one_ranks_weight_shard_rolls_back_all_ranks(fsdp: Any) -> None:
    faults = fsdp[0]["faults"]
    for label, rollback_step in [
        # every_step: the corrupted update is rolled back in the same step ...
        ("weight_nan_every_step", workers.WEIGHT_NAN_STEP + 1),
        # ... lazy: at the next step, when the NaN shows in the (global) loss and grads.
        ("weight_nan_lazy", workers.WEIGHT_NAN_STEP + 2),
    ]:
        stats = faults[label]["stats"]
        assert stats["rollbacks"] == 1, stats["events"]
        assert (rollback_step, "rollback") in stats["events"], stats["events"]
        # One step lost: the rolled-back one (lazy: the corrupting update counted as
        # good, and the step that found it is the failure).
        assert stats["good_steps"] == workers.FAULT_STEPS - 1


def test_fsdp2_step_communicates_only_small_all_reduces(fsdp: Any) -> None:
    # The norm and the loss mean share one all-reduce; the weight check after the update
    # (every_step) and a snapshot's own check are one more each; no gather, no DTensor
    # collective.
    for label in ("healthy", "healthy_every_step", "grad_nan", "weight_nan_lazy"):
        counted = [c for c in fsdp[0]["faults"][label]["collectives"] if c]
        assert counted, label
        assert all(set(c) == {ALL_REDUCE} and c[ALL_REDUCE] <= 3 for c in counted), counted


def test_fsdp2_healthy_step_takes_one_all_reduce(fsdp: Any) -> None:
    every = workers.SNAPSHOT_EVERY
    lazy = fsdp[0]["faults"]["healthy"]["collectives"]
    # Lazy weight check: one all-reduce (norm + loss), plus the snapshot's own check on the
    # steps that take one: the first (before it) and after every SNAPSHOT_EVERY good steps.
    assert [c[ALL_REDUCE] for c in lazy] == [
        2 if step == 0 or (step + 1) % every == 0 else 1 for step in range(workers.FAULT_STEPS)
    ]
    every_step = fsdp[0]["faults"]["healthy_every_step"]["collectives"]
    assert [c[ALL_REDUCE] for c in every_step] == [
        3 if step == 0 or (step + 1) % every == 0 else 2 for step in range(workers.FAULT_STEPS)
    ]


def test_fsdp2_checkpoint_recipe_resumes_exactly(fsdp: Any) -> None:
    for r in (fsdp[0]["checkpoint"], fsdp[1]["checkpoint"]):
        assert r["stats_at_load"]["steps"] == workers.CHECKPOINT_STEP
        assert r["stats_at_load"]["skipped_steps"] == 1
        assert _same_tensors(r["expected"], r["resumed"])
        _same_stats(r["expected_stats"], r["resumed_stats"])
    _same_stats(fsdp[0]["checkpoint"]["resumed_stats"], fsdp[1]["checkpoint"]["resumed_stats"])


def test_fsdp2_dcp_helpers_given_the_safe_optimizer_lose_its_state(fsdp: Any) -> None:
    """Why the docs say to pass ``opt.optimizer``: what happens with ``opt`` itself."""
    r = fsdp[0]["checkpoint"]
    assert r["pitfall_keys"] == ["param_groups", "state"]  # no "stableopt" entry
    # On a fresh optimizer DCP initialises the state by calling step(): one step counted.
    assert r["pitfall_stats_after_get"]["steps"] == 1
    # Loading through set_optimizer_state_dict finds no "stableopt" entry: counters reset.
    assert r["pitfall_stats_after_set"]["steps"] == 0

"""DeepSpeed ZeRO stages 1, 2 and 3 with SafeOptimizer as the client optimizer: 2 spawned
ranks on CPU (``DS_ACCELERATOR=cpu``), each holding a partition of the parameters, the
gradients and the optimizer state. Every decision is the same on both ranks and the
weights are those of a single-process run of the same global batch.

The first run builds DeepSpeed's CPU communication op (about a minute, once per machine).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests import _dist_workers as workers

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo"),
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None,
        reason="needs deepspeed (pip install -e '.[deepspeed]')",
    ),
]

STAGES = [1, 2, 3]


@pytest.fixture(scope="module")
def zero(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return workers.launch("zero", tmp_path_factory.mktemp("zero"), timeout=600.0)


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return workers.zero_reference()


def _same(a: Any, b: Any) -> bool:
    """Equal, NaN equal to NaN (a skipped step's norm or loss)."""
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("kind", ["faults", "corrupt"])
def test_every_rank_decides_the_same(zero: list[dict[str, Any]], stage: int, kind: str) -> None:
    first, second = (rank[f"stage{stage}-{kind}"] for rank in zero)
    # applied, skip reason, clip coefficient, norm, loss, weight check, for every step
    assert _same(first["decisions"], second["decisions"])
    assert first["stats"] == second["stats"]
    assert first["events"] == second["events"]
    assert all(torch.equal(a, b) for a, b in zip(first["weights"], second["weights"]))


@pytest.mark.parametrize("stage", STAGES)
def test_faults_on_one_rank_are_decided_for_the_whole_model(
    zero: list[dict[str, Any]], reference: dict[str, Any], stage: int
) -> None:
    run = zero[0][f"stage{stage}-faults"]
    by_step = {d[0]: d for d in run["decisions"]}
    # the x1e4 batch of rank 1: a spike of the mean loss, skipped on both ranks
    assert by_step[workers.ZERO_SPIKE][1:4] == (False, False, "SkipReason.LOSS_SPIKE")
    # the NaN target of rank 0: DeepSpeed's own overflow check skips it; counted here too
    assert by_step[workers.ZERO_NAN][1:4] == (False, False, "SkipReason.ENGINE_OVERFLOW")
    # the step after it trains (its loss is not mixed with the skipped step's)
    assert by_step[workers.ZERO_NAN + 1][1:3] == (True, True)
    # the same steps as the single process, the same weights
    assert [d[0] for d in run["decisions"] if d[2]] == [
        d[0] for d in reference["decisions"] if d[1]
    ]
    for ours, single in zip(run["weights"], reference["weights"]):
        torch.testing.assert_close(ours, single, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stage", STAGES)
def test_the_engine_and_the_optimizer_count_the_same_skips(
    zero: list[dict[str, Any]], stage: int
) -> None:
    run = zero[0][f"stage{stage}-faults"]
    assert run["stats"]["steps"] == run["engine_steps"] == workers.ZERO_STEPS
    assert run["stats"]["skipped_steps"] == run["engine_skipped"] == 2
    assert [d[0] for d in run["decisions"] if not d[1]] == [workers.ZERO_SPIKE, workers.ZERO_NAN]


@pytest.mark.parametrize("stage", STAGES)
def test_an_update_corrupting_one_ranks_partition_is_undone_on_every_rank(
    zero: list[dict[str, Any]], stage: int
) -> None:
    runs = [rank[f"stage{stage}-corrupt"] for rank in zero]
    for run in runs:
        by_step = {d[0]: d for d in run["decisions"]}
        assert by_step[workers.ZERO_CORRUPT][7] is False  # the weight check saw it, on both
        assert by_step[workers.ZERO_CORRUPT][1] is False  # and the engine: not applied
        assert run["stats"]["rollbacks"] == 1
        assert all(bool(torch.isfinite(w).all()) for w in run["weights"])
    assert runs[0]["events"] == runs[1]["events"]


def test_a_unit_wise_clip_is_refused_naming_it(zero: list[dict[str, Any]]) -> None:
    for rank in zero:
        assert rank["agc"].startswith("clip=AGCClip(")
        assert "DeepSpeed ZeRO" in rank["agc"]


def test_our_clip_is_deepspeeds_gradient_clipping_at_the_same_norm(
    zero: list[dict[str, Any]],
) -> None:
    """One coefficient for the whole model, from the norm over every rank's partition: the
    run clipped by SafeOptimizer(clip=c) is the run clipped by DeepSpeed's
    gradient_clipping=c (both clip every step here)."""
    for rank in zero:
        for ours, theirs in zip(rank["clip-ours"], rank["clip-deepspeed"]):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stage", STAGES)
def test_a_resume_through_the_engines_checkpoint_is_exact(
    zero: list[dict[str, Any]], stage: int
) -> None:
    """engine.save_checkpoint stores each rank's SafeOptimizer state dict (its "stableopt"
    entry included) and load_checkpoint gives it back: the resumed run continues as the
    straight one, counters included."""
    for rank in zero:
        run = rank[f"resume{stage}"]
        (straight, steps, skipped), (resumed, steps_after, skipped_after) = (
            run["straight"],
            run["resumed"],
        )
        assert run["resumed_at"] == workers.ZERO_SPIKE
        assert (steps_after, skipped_after) == (steps, skipped)
        assert all(torch.equal(a, b) for a, b in zip(straight, resumed))

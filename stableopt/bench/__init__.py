"""Fault-injection scenarios shared by the demo, the stability benchmark and the tests."""

from stableopt.bench.faults import (
    FAULT_KINDS,
    FaultInjector,
    FaultKind,
    FaultSchedule,
    RegressionTask,
    TrainingRun,
    inner_optimizer,
    make_mlp,
    run_training,
)

__all__ = [
    "FAULT_KINDS",
    "FaultInjector",
    "FaultKind",
    "FaultSchedule",
    "RegressionTask",
    "TrainingRun",
    "inner_optimizer",
    "make_mlp",
    "run_training",
]

"""Fault injection for tests, demos and benchmarks: reproducible NaN gradients, Inf losses,
spikes, poisoned batches and corrupting updates (see :mod:`stableopt.testing.faults`)."""

from stableopt.testing.faults import (
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

"""stableopt: PyTorch training that survives exploding gradients, NaN losses and corrupted weights."""

from stableopt.errors import DivergenceError
from stableopt.escalation import Escalation
from stableopt.ledger import Ledger
from stableopt.loss import ConsistencyLoss, SafeLoss
from stableopt.monitor import Event, Monitor, Sink
from stableopt.optimizer import SafeOptimizer
from stableopt.outcomes import Cause, EventKind
from stableopt.recommend import Recommendation
from stableopt.roles import LRPolicy, SkipRule
from stableopt.stages import (
    AGCClip,
    ClipPolicy,
    EmergencyClip,
    EmergencyLR,
    FixedClip,
    HotLR,
    LRBurst,
    PercentileClip,
    PlateauLR,
    Rollback,
    SpikeGuard,
    Stage,
    StepNumbers,
    ZScoreClip,
)
from stableopt.verdict import SkipReason, StepOutcome, StepVerdict

__all__ = [
    "AGCClip",
    "Cause",
    "ClipPolicy",
    "ConsistencyLoss",
    "DivergenceError",
    "EmergencyClip",
    "EmergencyLR",
    "Escalation",
    "EventKind",
    "Ledger",
    "Event",
    "FixedClip",
    "HotLR",
    "LRBurst",
    "LRPolicy",
    "Monitor",
    "PercentileClip",
    "PlateauLR",
    "Recommendation",
    "Rollback",
    "SafeLoss",
    "SafeOptimizer",
    "SkipReason",
    "SkipRule",
    "Sink",
    "SpikeGuard",
    "Stage",
    "StepNumbers",
    "StepOutcome",
    "StepVerdict",
    "ZScoreClip",
]

__version__ = "0.1.0"

"""stableopt: PyTorch training that survives exploding gradients, NaN losses and corrupted weights."""

from stableopt.errors import DivergenceError
from stableopt.escalation import Escalation
from stableopt.ledger import Ledger
from stableopt.loss import ConsistencyLoss, SafeLoss
from stableopt.monitor import Event, Monitor, Sink
from stableopt.optimizer import SafeOptimizer
from stableopt.recommend import Recommendation
from stableopt.stages import (
    AGCClip,
    ClipPolicy,
    EmergencyClip,
    EmergencyLR,
    FixedClip,
    HotLR,
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
    "ClipPolicy",
    "ConsistencyLoss",
    "DivergenceError",
    "EmergencyClip",
    "EmergencyLR",
    "Escalation",
    "Ledger",
    "Event",
    "FixedClip",
    "HotLR",
    "Monitor",
    "PercentileClip",
    "PlateauLR",
    "Recommendation",
    "Rollback",
    "SafeLoss",
    "SafeOptimizer",
    "SkipReason",
    "Sink",
    "SpikeGuard",
    "Stage",
    "StepNumbers",
    "StepOutcome",
    "StepVerdict",
    "ZScoreClip",
]

__version__ = "0.1.0"

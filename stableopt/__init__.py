"""stableopt: PyTorch training that survives exploding gradients, NaN losses and corrupted weights."""

from stableopt.adaptive import PercentileClip, ZScoreClip
from stableopt.agc import UnitwiseClip
from stableopt.clipping import ClipPolicy, FixedClip
from stableopt.emergency import EmergencyClip
from stableopt.errors import DivergenceError
from stableopt.loss import ConsistencyLoss, SafeLoss
from stableopt.lr import EmergencyLR, PlateauLR
from stableopt.monitor import Event, Monitor
from stableopt.optimizer import SafeOptimizer
from stableopt.rollback import Rollback
from stableopt.spike import SpikeGuard

__all__ = [
    "ClipPolicy",
    "ConsistencyLoss",
    "DivergenceError",
    "EmergencyClip",
    "EmergencyLR",
    "Event",
    "FixedClip",
    "Monitor",
    "PercentileClip",
    "PlateauLR",
    "Rollback",
    "SafeLoss",
    "SafeOptimizer",
    "SpikeGuard",
    "UnitwiseClip",
    "ZScoreClip",
]

__version__ = "0.1.0"

"""stableopt: PyTorch training that survives exploding gradients, NaN losses and corrupted weights."""

from stableopt.clipping import ClipPolicy, FixedClip
from stableopt.errors import DivergenceError
from stableopt.monitor import Event, Monitor
from stableopt.optimizer import SafeOptimizer
from stableopt.rollback import Rollback

__all__ = [
    "ClipPolicy",
    "DivergenceError",
    "Event",
    "FixedClip",
    "Monitor",
    "Rollback",
    "SafeOptimizer",
]

__version__ = "0.1.0"

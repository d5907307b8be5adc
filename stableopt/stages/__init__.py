"""The stages of the step pipeline, each a small object with its own state.

- **clip policy**: the largest total norm allowed this step:
  [`OutlierClip`][stableopt.stages.clip.OutlierClip] (the default: only the run's outliers),
  [`ZScoreClip`][stableopt.stages.zscore.ZScoreClip],
  [`PercentileClip`][stableopt.stages.percentile.PercentileClip],
  [`AGCClip`][stableopt.stages.agc.AGCClip] (unit-wise, in place),
  [`FixedClip`][stableopt.stages.clip.FixedClip];
- **emergency clip**: a tighter limit while the norm explodes
  ([`EmergencyClip`][stableopt.stages.emergency_clip.EmergencyClip]);
- **spike guard**: skip outlier losses and norms
  ([`SpikeGuard`][stableopt.stages.spike.SpikeGuard]);
- **emergency LR**: cut the LR when training blows up, recover it
  ([`EmergencyLR`][stableopt.stages.emergency_lr.EmergencyLR]);
- **hot LR**: cut the LR (with a rollback) when the loss climbs far above where the
  run started ([`HotLR`][stableopt.stages.hot_lr.HotLR]);
- **LR burst** (opt-in): hold back a scheduled LR far above every LR the run has used
  ([`LRBurst`][stableopt.stages.lr_burst.LRBurst]);
- **plateau LR**: lower the LR when the loss stalls
  ([`PlateauLR`][stableopt.stages.plateau.PlateauLR]);
- **rollback**: snapshots, and restoring them
  ([`Rollback`][stableopt.stages.rollback.Rollback]).

Every stage follows [`Stage`][stableopt.stages.base.Stage] (a ``name``,
``observe(numbers)``, ``state_dict()``, ``load_state_dict()``); clip policies follow
[`ClipPolicy`][stableopt.stages.base.ClipPolicy]. [`registry`][stableopt.registry]
maps the policy names to classes.
"""

from stableopt.stages.agc import AGCClip
from stableopt.stages.base import ClipPolicy, Stage, StepNumbers
from stableopt.stages.clip import FixedClip
from stableopt.stages.emergency_clip import EmergencyClip
from stableopt.stages.emergency_lr import EmergencyLR
from stableopt.stages.hot_lr import HotLR
from stableopt.stages.lr_burst import LRBurst
from stableopt.stages.percentile import PercentileClip
from stableopt.stages.plateau import PlateauLR
from stableopt.stages.rollback import Rollback
from stableopt.stages.spike import SpikeGuard
from stableopt.stages.zscore import ZScoreClip

__all__ = [
    "AGCClip",
    "ClipPolicy",
    "EmergencyClip",
    "EmergencyLR",
    "FixedClip",
    "HotLR",
    "LRBurst",
    "PercentileClip",
    "PlateauLR",
    "Rollback",
    "SpikeGuard",
    "Stage",
    "StepNumbers",
    "ZScoreClip",
]

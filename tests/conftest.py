"""Fixtures for every test module."""

from __future__ import annotations

import pytest

from stableopt.optimizer import SafeOptimizer


@pytest.fixture(params=["host", "device"])
def decide_on(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The step decided on the host (CPU gradients: the default) or, for a fused inner
    optimizer, on the device (the accelerator path: the skip in found_inf, the read after
    the update), forced on CPU tensors. A module that marks itself
    ``pytest.mark.usefixtures("decide_on")`` runs every test both ways."""
    monkeypatch.setattr(SafeOptimizer, "_cpu_reads_decide", request.param == "host")
    return str(request.param)

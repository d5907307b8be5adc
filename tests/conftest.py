"""Fixtures for every test module."""

from __future__ import annotations

import pytest

from stableopt._gate import StepGate


@pytest.fixture(params=["host", "device"])
def decide_on(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The step decided on the host (CPU gradients: the default) or on the device (the
    accelerator path, forced on CPU tensors). A module that marks itself
    ``pytest.mark.usefixtures("decide_on")`` runs every test both ways."""
    monkeypatch.setattr(StepGate, "_host_decisions", request.param == "host")
    return str(request.param)

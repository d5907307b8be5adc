"""torch.compile: a compiled model trains under SafeOptimizer unchanged; opt.step compiles with breaks."""

from __future__ import annotations

import torch
import torch._dynamo
from torch import nn

from stableopt import SafeOptimizer
from tests.helpers import batch, make_model, twin


def test_a_compiled_model_trains_and_skips_like_the_eager_one() -> None:
    model = make_model()
    reference = twin(model)
    compiled = torch.compile(model, backend="aot_eager")
    safe = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    eager = SafeOptimizer(torch.optim.AdamW(reference.parameters(), lr=1e-2))
    for step in range(15):
        for net, opt in ((compiled, safe), (reference, eager)):
            x, y = batch(step)
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            if step == 5:
                opt.optimizer.param_groups[0]["params"][0].grad.view(-1)[0] = float("nan")
            opt.step()
    assert safe.stats()["skipped_steps"] == eager.stats()["skipped_steps"] == 1
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_compiling_step_itself_breaks_at_the_host_reads() -> None:
    """Measured and documented: the host reads of the step's numbers are graph breaks."""
    model = make_model()
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    x, y = batch(0)
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.observe_loss(loss)
    explanation = torch._dynamo.explain(opt.step)()
    reasons = " ".join(str(b.reason) for b in explanation.break_reasons)
    assert explanation.graph_break_count >= 1
    # CPU gradients: the norm and the loss are read (item) and decided in floats
    assert "Tensor.item()" in reasons
    torch._dynamo.reset()


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1))


def _bn_run(skip_bad: bool) -> nn.Module:
    model = _bn_model()
    compiled = torch.compile(model, backend="aot_eager")
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    for step in range(12):
        x, y = batch(step)
        if step == 6:
            if skip_bad:
                continue
            x = x.clone()
            x[0, 0] = float("nan")
        opt.zero_grad()
        nn.functional.mse_loss(compiled(x), y).backward()
        opt.step()
    if not skip_bad:
        assert opt.stats()["skipped_steps"] == 1
    return model


def test_a_compiled_batchnorm_model_skips_a_nan_batch_without_a_trace() -> None:
    """The compiled graph writes the running statistics back into the buffers: put back."""
    model, never = _bn_run(skip_bad=False), _bn_run(skip_bad=True)
    for (name, a), (_, b) in zip(model.state_dict().items(), never.state_dict().items()):
        assert torch.equal(a, b), name

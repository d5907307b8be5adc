"""A step that does not update leaves no trace in the model: its buffers included.

The references are runs that never saw the bad batch (the same RNG for every other
step), with the bare torch optimizer where the wrapper is asked to be transparent
(``clip=None``), and with the same wrapper otherwise. Bit for bit: ``torch.equal``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from stableopt import Rollback, SafeOptimizer, SkipReason
from stableopt.buffers import NORM_STATS_WARMUP, SMALL_BUFFER

BAD_STEP = 36  # after the spike guard's min_history (32) and the statistics' warm-up
STEPS = 44

# -- a BatchNorm CNN ----------------------------------------------------------------------


def make_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def cnn_batch(step: int) -> tuple[Tensor, Tensor]:
    """Four classes, each an image template, plus noise."""
    g = torch.Generator().manual_seed(1000 + step)
    templates = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.randint(0, 4, (16,), generator=g)
    return templates[labels] + torch.randn(16, 3, 8, 8, generator=g), labels


def cnn_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


# -- a Tacotron-style model: BatchNorm encoder and postnet, location-sensitive attention --

N_MEL, DIM, VOCAB = 6, 12, 10


class TinyTacotron(nn.Module):
    """Character embedding, conv + BatchNorm + BiLSTM encoder, prenet with dropout always on,
    an attention LSTM cell with location-sensitive attention, mel and gate projections, a
    postnet of convs with BatchNorm and tanh; teacher forcing (the target frames feed the
    decoder)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.encoder_conv = nn.Sequential(
            nn.Conv1d(DIM, DIM, 3, padding=1), nn.BatchNorm1d(DIM), nn.ReLU()
        )
        self.encoder_rnn = nn.LSTM(DIM, DIM // 2, batch_first=True, bidirectional=True)
        self.prenet = nn.Linear(N_MEL, DIM)
        self.attention_rnn = nn.LSTMCell(2 * DIM, DIM)
        self.query = nn.Linear(DIM, DIM, bias=False)
        self.memory = nn.Linear(DIM, DIM, bias=False)
        self.location = nn.Conv1d(1, DIM, 5, padding=2, bias=False)
        self.energy = nn.Linear(DIM, 1, bias=False)
        self.mel = nn.Linear(2 * DIM, N_MEL)
        self.gate = nn.Linear(2 * DIM, 1)
        self.postnet = nn.Sequential(
            nn.Conv1d(N_MEL, DIM, 5, padding=2),
            nn.BatchNorm1d(DIM),
            nn.Tanh(),
            nn.Conv1d(DIM, N_MEL, 5, padding=2),
            nn.BatchNorm1d(N_MEL),
        )

    def forward(self, text: Tensor, mel: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, frames = mel.shape[0], mel.shape[2]
        memory = self.encoder_rnn(self.encoder_conv(self.embed(text).transpose(1, 2)).mT)[0]
        keys = self.memory(memory)
        h = c = context = mel.new_zeros(batch, DIM)
        weights = mel.new_zeros(batch, text.shape[1])
        previous = mel.new_zeros(batch, N_MEL)
        frames_out, gates = [], []
        for t in range(frames):
            x = F.dropout(F.relu(self.prenet(previous)), 0.5, training=True)
            h, c = self.attention_rnn(torch.cat([x, context], 1), (h, c))
            location = self.location(weights[:, None]).mT
            energies = self.energy(torch.tanh(self.query(h)[:, None] + keys + location))
            weights = energies.squeeze(-1).softmax(-1)
            context = torch.bmm(weights[:, None], memory).squeeze(1)
            out = torch.cat([h, context], 1)
            frames_out.append(self.mel(out))
            gates.append(self.gate(out))
            previous = mel[:, :, t]
        mel_out = torch.stack(frames_out, 2)
        return mel_out, mel_out + self.postnet(mel_out), torch.cat(gates, 1)


def make_tacotron() -> nn.Module:
    torch.manual_seed(0)
    return TinyTacotron()


def tacotron_batch(step: int) -> tuple[Tensor, Tensor, Tensor]:
    """Synthetic aligned pairs: each character holds its own mel template for 2 frames."""
    g = torch.Generator().manual_seed(2000 + step)
    templates = torch.randn(VOCAB, N_MEL, generator=torch.Generator().manual_seed(7))
    text = torch.randint(0, VOCAB, (4, 5), generator=g)
    mel = templates[text].repeat_interleave(2, dim=1).transpose(1, 2).contiguous()
    mel = mel + 0.1 * torch.randn(mel.shape, generator=g)
    gate = torch.zeros(4, mel.shape[2])
    gate[:, -1] = 1.0
    return text, mel, gate


def tacotron_loss(model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    text, mel, gate = batch
    mel_out, postnet_out, gate_out = model(text, mel)
    return (
        F.mse_loss(mel_out, mel)
        + F.mse_loss(postnet_out, mel)
        + F.binary_cross_entropy_with_logits(gate_out, gate)
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], Any], Callable[..., Tensor]]] = {
    "cnn": (make_cnn, cnn_batch, cnn_loss),
    "tacotron": (make_tacotron, tacotron_batch, tacotron_loss),
}


def corrupt(name: str, batch: Any, fault: str) -> Any:
    """The bad batch: a NaN, an Inf or x1e6 in the CNN's images or the Tacotron's mel
    targets (teacher forcing feeds them to the decoder)."""
    index = 0 if name == "cnn" else 1
    data = [t.clone() for t in batch]
    value = data[index]
    if fault == "nan":
        value.view(-1)[0] = math.nan
    elif fault == "inf":
        value.view(-1)[0] = math.inf
    else:
        data[index] = value * 1e6
    return tuple(data)


def train(
    name: str,
    make_opt: Callable[[nn.Module], Any],
    fault: str | None,
    *,
    steps: int = STEPS,
    bad_step: int = BAD_STEP,
) -> tuple[nn.Module, Any]:
    """The loop; ``fault=None`` never feeds the bad step's batch at all. The RNG is seeded
    per step, so a run that never saw the batch draws the same dropout masks elsewhere."""
    make_model, make_batch, loss_of = MODELS[name]
    model = make_model()
    opt = make_opt(model)
    for step in range(1, steps + 1):
        batch = make_batch(step)
        if step == bad_step:
            if fault is None:
                continue
            batch = corrupt(name, batch, fault)
        torch.manual_seed(step)
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
    return model, opt


def held_out(name: str, model: nn.Module) -> Tensor:
    model.eval()
    try:
        with torch.no_grad():
            torch.manual_seed(0)
            return MODELS[name][2](model, MODELS[name][1](10_000))
    finally:
        model.train()


def same_model(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-6, weight_decay=1e-6)


INNER = {"cnn": sgd, "tacotron": adam}


@pytest.mark.parametrize("fault", ["nan", "inf", "x1e6"])
@pytest.mark.parametrize("name", ["cnn", "tacotron"])
def test_a_bad_batch_leaves_the_model_as_if_it_never_came(name: str, fault: str) -> None:
    inner = INNER[name]
    model, opt = train(name, lambda m: SafeOptimizer(inner(m)), fault)
    never, _ = train(name, lambda m: SafeOptimizer(inner(m)), None)
    assert opt.stats()["skipped_steps"] == 1
    assert opt.last_verdict is not None
    assert same_model(model, never)  # weights and every buffer, bit for bit
    loss = held_out(name, model)
    assert torch.isfinite(loss) and torch.equal(loss, held_out(name, never))
    kinds = [e.kind for e in opt.events() if e.step == BAD_STEP]
    assert kinds[0] == "skip"
    if fault != "x1e6":  # the forward wrote NaN/Inf into the running statistics: said so
        restored = [e for e in opt.events() if e.kind == "buffers_restored"]
        assert len(restored) == 1 and restored[0].step == BAD_STEP
        assert restored[0].data["skipped"] == 1.0 and restored[0].data["modules"] >= 1


@pytest.mark.parametrize("name", ["cnn", "tacotron"])
def test_transparent_wrapper_equals_the_bare_optimizer_that_never_saw_the_batch(
    name: str,
) -> None:
    """``clip=None``: the wrapper skipping the NaN batch equals bare torch without it."""
    inner = INNER[name]
    model, opt = train(name, lambda m: SafeOptimizer(inner(m), clip=None), "nan")
    bare, _ = train(name, inner, None)
    assert opt.stats()["skipped_steps"] == 1
    assert same_model(model, bare)


def test_an_unnormalised_batch_is_a_running_statistics_spike() -> None:
    """A batch x1e6 gives a BatchNorm model ordinary gradients and loss; its running
    variance grows about 1e11x. It is skipped as a spike of the running statistics."""
    model, opt = train("cnn", lambda m: SafeOptimizer(sgd(m)), "x1e6")
    assert opt.stats()["spike_skips"] == 1
    skip = next(e for e in opt.events() if e.kind == "skip")
    assert skip.step == BAD_STEP and skip.data["grad_norm"] < 10  # ordinary gradients
    plain_model = make_cnn()
    plain = sgd(plain_model)
    for step in range(1, STEPS + 1):  # the recipe's own loop, no wrapper: the model is ruined
        batch = cnn_batch(step)
        if step == BAD_STEP:
            batch = corrupt("cnn", batch, "x1e6")
        plain.zero_grad()
        cnn_loss(plain_model, batch).backward()
        plain.step()
    ruined = plain_model[1].running_var.sum() / model[1].running_var.sum()
    assert ruined > 1e8
    assert held_out("cnn", plain_model) > 1.5 * held_out("cnn", model)


def test_healthy_batchnorm_training_is_never_judged_a_statistics_spike() -> None:
    model, opt = train("cnn", lambda m: SafeOptimizer(sgd(m)), None, steps=80, bad_step=0)
    assert opt.stats()["skipped_steps"] == 0
    assert opt.model_buffers.steps_seen >= NORM_STATS_WARMUP


def test_statistics_spikes_at_one_level_become_the_new_level() -> None:
    """Data that really changed scale (x1e3 from a step on): three spikes, then the level."""
    model = make_cnn()
    opt = SafeOptimizer(sgd(model))
    for step in range(1, 61):
        x, y = cnn_batch(step)
        if step >= 40:
            x = x * 1e3
        opt.zero_grad()
        cnn_loss(model, (x, y)).backward()
        opt.step()
    stats = opt.stats()
    assert stats["new_levels"] == 1 and stats["skipped_steps"] == 3
    assert [e.step for e in opt.events() if e.kind == "new_level"] == [42]


# -- rollbacks --------------------------------------------------------------------------


def _buffers(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


def test_a_rollback_after_failed_steps_restores_the_snapshots_buffers() -> None:
    """NaN batches at steps 25-29: the 5th failure restores the snapshot of step 20, and the
    BatchNorm statistics go back with the weights."""
    model = make_cnn()
    opt = SafeOptimizer(sgd(model), rollback=Rollback(every_steps=10))
    at_snapshot: dict[str, Tensor] = {}
    weights: list[Tensor] = []
    for step in range(1, 30):
        batch = cnn_batch(step)
        if step >= 25:
            batch = corrupt("cnn", batch, "nan")
        opt.zero_grad()
        cnn_loss(model, batch).backward()
        opt.step()
        if step == 20:
            at_snapshot = _buffers(model)
            weights = [p.detach().clone() for p in model.parameters()]
    assert opt.last_step is not None and opt.last_step.status == "rolled_back"
    assert opt.rollback is not None and opt.rollback.snapshot_step == 20
    now = _buffers(model)
    assert all(torch.equal(now[k], at_snapshot[k]) for k in now)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), weights))
    last = _buffers(model)  # taken before any other change
    assert not any(torch.equal(last[k], v) for k, v in _buffers(make_cnn()).items() if "var" in k)


def test_a_corrupting_update_found_late_puts_back_the_buffers_it_poisoned() -> None:
    """check_weights="lazy": a NaN lands in a weight after step 30; the forward of step 31
    carries it into the BatchNorm statistics and the loss. The rollback restores the
    snapshot (scope="all"): weights and buffers of step 30."""
    model = make_cnn()
    rollback = Rollback(every_steps=10, scope="all")
    opt = SafeOptimizer(sgd(model), rollback=rollback, check_weights="lazy")
    at_snapshot: dict[str, Tensor] = {}
    for step in range(1, 32):
        opt.zero_grad()
        cnn_loss(model, cnn_batch(step)).backward()
        opt.step()
        if step == 30:  # the snapshot is taken at the end of this step
            at_snapshot = _buffers(model)
            with torch.no_grad():
                model[0].weight.view(-1)[0] = math.nan  # what a faulty update leaves
    assert opt.stats()["rollbacks"] == 1
    now = _buffers(model)
    assert all(torch.isfinite(v.float()).all() for v in now.values())
    assert all(torch.equal(now[k], at_snapshot[k]) for k in now)


class WithRunningMean(nn.Module):
    """A custom layer that keeps a running mean of its input in ``forward`` (an EMA buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 1)
        self.register_buffer("running_mean", torch.zeros(8))

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        with torch.no_grad():
            self.running_mean.lerp_(x.mean(0), 0.1)
        return self.linear(x[valid])  # padding rows are left out of the output


def test_a_nan_buffer_left_by_an_accepted_step_is_put_back() -> None:
    """A NaN in a sample the loss masks out still reaches a running mean kept in forward:
    the loss and gradients are finite, the update is kept, and the buffer goes back to
    before the forward."""
    model = WithRunningMean()
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    before: dict[str, Tensor] = {}
    for step in range(1, 31):
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(step))
        before = _buffers(model)
        if step == 30:
            x[0, 0] = math.nan
        opt.zero_grad()
        valid = torch.arange(16) > 0  # sample 0 is padding: out of the loss
        model(x, valid).square().mean().backward()
        opt.step()
    assert opt.last_step is not None and opt.last_step.status == "updated"
    assert torch.equal(model.running_mean, before["running_mean"])
    event = [e for e in opt.events() if e.kind == "buffers_restored"][-1]
    assert event.step == 30 and event.data["skipped"] == 0.0
    assert opt.stats()["buffer_restores"] == 1


# -- discovery --------------------------------------------------------------------------


def test_the_model_the_calling_code_holds_is_found_at_construction() -> None:
    model = make_cnn()
    opt = SafeOptimizer(sgd(model))
    assert opt.model_buffers.roots == [model]
    assert opt.model_buffers._discovery is None  # no hook: forward passes pay nothing
    names = {w.path + "." + w.name for w in opt.model_buffers.buffers}
    assert names == {
        f"{i}.{n}" for i in (1, 4) for n in ("running_mean", "running_var", "num_batches_tracked")
    }


def test_a_model_out_of_sight_is_found_from_the_first_forward_pass() -> None:
    """Nothing in the calling code holds the model (only its parameters): the first forward
    pass tells, through a global hook removed at the first step."""
    holder = [make_cnn()]  # a list: not searched
    opt = SafeOptimizer(torch.optim.SGD(holder[0].parameters(), lr=0.05, momentum=0.9))
    assert opt.model_buffers.roots == [] and opt.model_buffers._discovery is not None
    opt.zero_grad()
    cnn_loss(holder[0], cnn_batch(1)).backward()
    opt.step()
    assert opt.model_buffers.roots == [holder[0]]
    assert opt.model_buffers._discovery is None  # later forward passes pay nothing for it


def test_a_wrapper_called_first_is_the_root() -> None:
    """DDP, FSDP2 or torch.compile wrap the model: the outermost module called is the root."""

    class Wrapper(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Tensor) -> Tensor:
            return self.inner(x)

    model = make_cnn()
    wrapped = Wrapper(model)
    opt = SafeOptimizer(sgd(model))
    x, y = cnn_batch(1)
    F.cross_entropy(wrapped(x), y).backward()
    opt.step()
    assert opt.model_buffers.roots == [wrapped]


def test_a_model_used_without_a_module_call_says_so_once_and_watch_fixes_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bn = nn.BatchNorm1d(4)
    weight = torch.ones(4, requires_grad=True)

    def forward(x: Tensor) -> Tensor:  # a functional model: BatchNorm's buffers, no call
        return F.batch_norm(x, bn.running_mean, bn.running_var, weight, None, training=True)

    opt = SafeOptimizer(torch.optim.SGD([weight], lr=0.1))
    with caplog.at_level(logging.WARNING, logger="stableopt"):
        for _ in range(3):
            opt.zero_grad()
            forward(torch.randn(8, 4)).square().mean().backward()
            opt.step()
    blind = [r for r in caplog.records if "opt.watch(model)" in r.getMessage()]
    assert len(blind) == 1
    opt.watch(bn)
    opt.step()  # the step that keeps them
    before = bn.running_var.clone()
    x = torch.randn(8, 4)
    x[0, 0] = math.nan
    opt.zero_grad()
    forward(x).square().mean().backward()
    opt.step()
    assert opt.last_step is not None and opt.last_step.skip_reason is SkipReason.NONFINITE_GRADS
    assert torch.equal(bn.running_var, before)


def test_watch_rejects_what_is_not_a_module() -> None:
    opt = SafeOptimizer(sgd(make_cnn()))
    with pytest.raises(TypeError, match="watch"):
        opt.watch("model")  # type: ignore[arg-type]


class WithMask(nn.Module):
    """A causal mask (large, never written unless asked) beside a BatchNorm layer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(300, 300).tril())
        self.linear = nn.Linear(8, 8)
        self.norm = nn.BatchNorm1d(8)
        self.write_mask = False

    def forward(self, x: Tensor) -> Tensor:
        if self.write_mask:
            with torch.no_grad():
                self.mask.mul_(2.0)
        return self.norm(self.linear(x)) * self.mask[0, 0]


def test_large_buffers_that_never_change_are_not_copied_each_step() -> None:
    model = WithMask()
    assert model.mask.numel() > SMALL_BUFFER
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    kept: list[Tensor] = []
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(16, 8)).square().mean().backward()
        opt.step()
        mask = next(w for w in opt.model_buffers.buffers if w.name == "mask")
        kept.append(mask.kept)  # type: ignore[arg-type]
        assert not mask.has_moved()  # nothing to copy: the same tensor, the same version
        norm = next(w for w in opt.model_buffers.buffers if w.name == "running_mean")
        assert norm.has_moved()  # small: copied each time (BatchNorm bumps no version)
    assert all(k is kept[0] for k in kept)  # one copy, made once


def test_a_large_buffer_written_in_place_is_kept_by_its_version() -> None:
    model = WithMask()
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    for step in range(35):
        x = torch.randn(16, 8)
        if step == 34:
            x[0, 0] = math.nan
            model.write_mask = True  # written in the failing step's forward
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert opt.stats()["skipped_steps"] == 1
    assert torch.equal(model.mask, torch.ones(300, 300).tril())


# -- state_dict, pickling, rerun --------------------------------------------------------


def test_the_snapshots_buffers_survive_a_state_dict_round_trip() -> None:
    """Rollback(in_state_dict=True): a resumed run rolls back to the same buffers."""
    model = make_cnn()
    opt = SafeOptimizer(sgd(model), rollback=Rollback(every_steps=10, in_state_dict=True))
    for step in range(1, 21):
        opt.zero_grad()
        cnn_loss(model, cnn_batch(step)).backward()
        opt.step()
    at_snapshot = _buffers(model)
    for step in range(21, 25):
        opt.zero_grad()
        cnn_loss(model, cnn_batch(step)).backward()
        opt.step()
    saved_model, saved_opt = model.state_dict(), opt.state_dict()
    resumed = make_cnn()
    resumed.load_state_dict(saved_model)
    opt2 = SafeOptimizer(sgd(resumed), rollback=Rollback(every_steps=10, in_state_dict=True))
    opt2.load_state_dict(saved_opt)
    for step in range(25, 30):  # five NaN batches: a rollback to the snapshot of step 20
        opt2.zero_grad()
        cnn_loss(resumed, corrupt("cnn", cnn_batch(step), "nan")).backward()
        opt2.step()
    assert opt2.stats()["rollbacks"] == 1
    now = _buffers(resumed)
    assert all(torch.equal(now[k], at_snapshot[k]) for k in now)


def test_a_rerun_starts_from_the_buffers_the_first_evaluation_started_from() -> None:
    """A transient fault re-runs the closure: the BatchNorm statistics see the batch once,
    as in a clean step."""
    model, clean = make_cnn(), make_cnn()
    opt = SafeOptimizer(sgd(model))
    reference = SafeOptimizer(sgd(clean))
    for step in range(1, 40):
        batch = cnn_batch(step)
        calls = 0

        def closure(net: nn.Module = model, batch: Any = batch, step: int = step) -> Tensor:
            nonlocal calls
            calls += 1
            opt.zero_grad()
            loss = cnn_loss(net, batch)
            loss.backward()
            if step == 35 and calls == 1:  # a flaky device: the first evaluation is NaN
                next(net.parameters()).grad.view(-1)[0] = math.nan  # type: ignore[union-attr]
            return loss

        def clean_closure(net: nn.Module = clean, batch: Any = batch) -> Tensor:
            reference.zero_grad()
            loss = cnn_loss(net, batch)
            loss.backward()
            return loss

        opt.step(closure)
        reference.step(clean_closure)
    assert opt.stats()["transient_faults"] == 1
    assert same_model(model, clean)


def test_a_pickled_optimizer_finds_its_modules_again() -> None:
    import pickle

    model = make_cnn()
    opt = SafeOptimizer(sgd(model))
    opt.zero_grad()
    cnn_loss(model, cnn_batch(1)).backward()
    opt.step()
    clone = pickle.loads(pickle.dumps(opt))
    assert clone.model_buffers.roots == []  # modules do not travel with it


def test_an_evaluation_under_inference_mode_between_steps_keeps_ordinary_copies() -> None:
    """torchvision's reference evaluates under ``torch.inference_mode()``: the forward pre-hook
    keeps the buffers there, and the next training step must still run (and put back)."""
    holder = [make_cnn()]  # out of sight: found by the first forward pass, an evaluation
    opt = SafeOptimizer(torch.optim.SGD(holder[0].parameters(), lr=0.05, momentum=0.9))
    model = holder[0]
    for step in range(1, 26):
        model.eval()
        with torch.inference_mode():
            model(cnn_batch(0)[0])
        model.train()
        batch = corrupt("cnn", cnn_batch(step), "nan") if step == 25 else cnn_batch(step)
        before = _buffers(model)
        opt.zero_grad()
        cnn_loss(model, batch).backward()
        opt.step()
    assert opt.stats()["skipped_steps"] == 1 and opt.model_buffers.roots == [model]
    kept = [w.kept for w in opt.model_buffers.buffers if w.kept is not None]
    assert kept and not any(t.is_inference() for t in kept)
    assert all(torch.equal(v, before[k]) for k, v in _buffers(model).items())

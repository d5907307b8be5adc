"""PyTorch Lightning integration: a real Trainer on CPU with a SafeOptimizer."""

from __future__ import annotations

import csv
import importlib
import sys
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("lightning.pytorch")

import lightning.pytorch as pl  # noqa: E402

from stableopt import SafeOptimizer  # noqa: E402
from stableopt.integrations import find_safe_optimizer  # noqa: E402
from stableopt.integrations.lightning import StableOptCallback, log_stats  # noqa: E402

# Lightning's own noise on this torch and on a CPU test box: not about stableopt.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*LeafSpec.*", "ignore:.*does not have many workers.*"
)


class Regression(pl.LightningModule):
    """A tiny MLP whose loss is NaN on chosen optimizer steps (0-based global_step)."""

    def __init__(
        self, nan_steps: tuple[int, ...] = (), with_scheduler: bool = False, clip: Any = "zscore"
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        self.nan_steps = set(nan_steps)
        self.with_scheduler = with_scheduler
        self.clip = clip
        self.before: dict[int, list[torch.Tensor]] = {}
        self.after: dict[int, list[torch.Tensor]] = {}
        self.lrs: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.global_step in self.nan_steps:
            loss = loss * float("nan")
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.before[self.global_step] = [p.detach().clone() for p in self.parameters()]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.after[self.global_step - 1] = [p.detach().clone() for p in self.parameters()]

    def configure_optimizers(self) -> Any:
        self.safe = SafeOptimizer(torch.optim.AdamW(self.parameters(), lr=1e-2), clip=self.clip)
        if not self.with_scheduler:
            return self.safe
        sched = torch.optim.lr_scheduler.StepLR(self.safe, step_size=2, gamma=0.5)
        return {"optimizer": self.safe, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader(n: int = 64) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(dim=1, keepdim=True)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def make_trainer(tmp_path: Any, max_steps: int = 8, **kwargs: Any) -> Any:
    defaults: dict[str, Any] = dict(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    return pl.Trainer(**{**defaults, **kwargs})


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_trains_and_skips_nan_step_under_automatic_optimization(tmp_path: Any) -> None:
    """Lightning issue 4956: a NaN loss must not reach the weights."""
    model = Regression(nan_steps=(3,))
    trainer = make_trainer(tmp_path)
    trainer.fit(model, loader())
    stats = model.safe.stats()
    assert stats["steps"] == 8 and stats["skipped_steps"] == 1 and stats["good_steps"] == 7
    assert stats["loss"] is not None  # the loss came from Lightning's closure
    # the NaN step left the weights unchanged; the others moved them
    assert all(torch.equal(p, q) for p, q in zip(model.before[3], model.after[3]))
    assert not all(torch.equal(p, q) for p, q in zip(model.before[2], model.after[2]))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert trainer.global_step == 8  # Lightning counts the skipped step as a step


def test_param_groups_identity_and_scheduler(tmp_path: Any) -> None:
    model = Regression(with_scheduler=True, clip=None)
    trainer = make_trainer(tmp_path, max_steps=6)
    trainer.fit(model, loader())
    wrapped = trainer.optimizers[0]
    lightning_opt: Any = model.optimizers()
    assert find_safe_optimizer(lightning_opt) is model.safe
    assert find_safe_optimizer(wrapped) is model.safe
    assert lightning_opt.param_groups is model.safe.param_groups
    assert model.safe.param_groups is model.safe.optimizer.param_groups
    # StepLR(step_size=2, gamma=0.5) stepped every optimizer step
    assert model.lrs == pytest.approx([1e-2, 1e-2, 5e-3, 5e-3, 2.5e-3, 2.5e-3])
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is model.safe
    assert model.safe.stats()["steps"] == 6


def run_logged(tmp_path: Any, every_n_steps: int) -> list[tuple[int, float, float]]:
    """(CSV step, stableopt/skipped_steps, stableopt/step_skipped) of every row; the NaN
    loss is at step 3 (1-based)."""
    model = Regression(nan_steps=(2,))
    logger = pl.loggers.CSVLogger(str(tmp_path), name=f"every{every_n_steps}")
    trainer = make_trainer(
        tmp_path,
        max_steps=6,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[StableOptCallback(every_n_steps)],
    )
    trainer.fit(model, loader())
    assert trainer.callback_metrics["stableopt/skipped_steps"] == 1.0
    assert "stableopt/grad_norm" in trainer.callback_metrics
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("stableopt/skipped_steps")]
    return [
        (int(r["step"]), float(r["stableopt/skipped_steps"]), float(r["stableopt/step_skipped"]))
        for r in rows
    ]


def test_callback_logs_metrics_to_the_trainer_loggers(tmp_path: Any) -> None:
    # Lightning writes a row at global_step - 1; step_skipped marks the one step skipped
    assert run_logged(tmp_path, 1) == [
        (0, 0.0, 0.0),
        (1, 0.0, 0.0),
        (2, 1.0, 1.0),
        (3, 1.0, 0.0),
        (4, 1.0, 0.0),
        (5, 1.0, 0.0),
    ]
    # every 3 steps: nothing before the 3rd step (Lightning repeats a step metric's last
    # value in the rows that follow until it is logged again)
    assert run_logged(tmp_path, 3)[0] == (2, 1.0, 1.0)


def test_same_parameters_as_a_plain_loop_with_clip_grad_norm(tmp_path: Any) -> None:
    """Transparent when healthy: Lightning's closure step == AdamW + clip_grad_norm_ by hand."""
    model = Regression(clip=1.0)
    make_trainer(tmp_path).fit(model, loader())
    assert model.safe.stats()["skipped_steps"] == 0

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for x, y in loader():
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
    for p, q in zip(model.net.parameters(), net.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


class GradNormProbe(pl.Callback):
    """The total gradient norm before Lightning's clipping, and ours after the step."""

    def __init__(self) -> None:
        self.before_clip: list[float] = []
        self.recorded: list[float] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        # runs inside the closure, before Lightning's configure_gradient_clipping
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.before_clip.append(
            float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))
        )

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.recorded.append(pl_module.safe.stats()["grad_norm"])


@pytest.mark.parametrize("disable", [True, False])
def test_lightning_clipping_is_turned_off_and_grad_norm_is_pre_clip(
    tmp_path: Any, caplog: Any, disable: bool
) -> None:
    model = Regression(clip=0.5)
    probe = GradNormProbe()
    trainer = make_trainer(
        tmp_path,
        max_steps=4,
        gradient_clip_val=0.01,
        callbacks=[StableOptCallback(disable_trainer_clipping=disable), probe],
    )
    with caplog.at_level("INFO", logger="stableopt"):
        trainer.fit(model, loader())
    assert min(probe.before_clip) > 0.5
    if disable:
        assert trainer.gradient_clip_val is None
        assert "Lightning's own clipping is turned off" in caplog.text
        assert probe.recorded == pytest.approx(probe.before_clip, rel=1e-5)
        assert model.safe.stats()["total_clips"] == 4
    else:  # what it prevents: our policy would only see Lightning's clipped gradients
        assert trainer.gradient_clip_val == 0.01
        assert probe.recorded == pytest.approx([0.01] * 4, rel=1e-4)
        assert model.safe.stats()["total_clips"] == 0


class LogsItself(Regression):
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        # the LightningOptimizer wrapper is unwrapped: values are the SafeOptimizer's own
        self.logged = log_stats(self, self.optimizers())


def test_log_stats_from_the_module(tmp_path: Any) -> None:
    model = LogsItself(nan_steps=(1,))
    trainer = make_trainer(tmp_path, max_steps=3)
    trainer.fit(model, loader())
    stats = model.safe.stats()
    assert model.logged["stableopt/skipped_steps"] == 1.0
    assert model.logged["stableopt/grad_norm"] == pytest.approx(stats["grad_norm"])
    assert model.logged["stableopt/loss"] == pytest.approx(stats["loss"])
    for name, value in model.logged.items():
        assert float(trainer.callback_metrics[name]) == pytest.approx(value)
    with pytest.raises(TypeError, match="SafeOptimizer"):
        log_stats(model, torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_checkpoint_resume_continues_counters(tmp_path: Any) -> None:
    """Lightning saves optimizer.state_dict() in its checkpoints; our counters come back."""
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_top_k=-1, save_on_train_epoch_end=True, filename="{step}"
    )
    data = loader(32)  # 4 batches an epoch
    full, full_norms = Regression(nan_steps=(1,)), GradNormProbe()
    trainer = make_trainer(tmp_path, enable_checkpointing=True, callbacks=[checkpoints, full_norms])
    trainer.fit(full, data)
    checkpoint = tmp_path / "ckpt" / "step=4.ckpt"
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["optimizer_states"][0]["stableopt"]["monitor"]["counters"]["steps"] == 4

    resumed, resumed_norms = Regression(nan_steps=(1,)), GradNormProbe()  # all fresh
    trainer = make_trainer(tmp_path, callbacks=[resumed_norms])
    trainer.fit(resumed, data, ckpt_path=str(checkpoint))
    keys = ("steps", "good_steps", "skipped_steps", "lr_changes", "total_clips", "lr_factor")
    assert {k: resumed.safe.stats()[k] for k in keys} == {k: full.safe.stats()[k] for k in keys}
    assert resumed.safe.stats()["steps"] == 8 and resumed.safe.stats()["skipped_steps"] == 1
    assert resumed.safe.optimizer.state_dict()["state"][0]["step"] == 7  # 8 steps, 1 skipped
    # Step 5 sees the restored weights and batch 0 in both runs. (After it, Lightning's
    # resume from an epoch-end checkpoint replays batch 0 once more: its data order, not ours.)
    assert resumed_norms.recorded[0] == full_norms.recorded[4]


class Manual(Regression):
    """Manual optimization that reports a NaN loss at step 2 while its gradients are finite."""

    def __init__(self, via_wrapper: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.via_wrapper = via_wrapper

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt: Any = self.optimizers()
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        reported = loss * float("nan") if self.global_step == 2 else loss
        target = opt if self.via_wrapper else find_safe_optimizer(opt)
        assert target is not None
        target.observe_loss(reported)
        opt.step()
        return loss.detach()


@pytest.mark.parametrize(
    "via_wrapper",
    [False, True],
)
def test_manual_optimization_observe_loss(tmp_path: Any, via_wrapper: bool) -> None:
    model = Manual(via_wrapper)
    make_trainer(tmp_path, max_steps=4).fit(model, loader())
    stats = model.safe.stats()
    assert stats["steps"] == 4
    assert stats["skipped_steps"] == 1  # the reported NaN loss, though the gradients were finite
    assert all(torch.equal(p, q) for p, q in zip(model.before[2], model.after[2]))


def test_callback_finds_the_optimizer_through_the_wrapper(tmp_path: Any) -> None:
    model = Regression()
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit(model, loader())
    callback = StableOptCallback(optimizer=model.optimizers())
    assert callback.optimizer is model.safe
    with pytest.raises(TypeError, match="SafeOptimizer"):
        StableOptCallback(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_callback_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="every_n_steps"):
        StableOptCallback(every_n_steps=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every_n_steps"):
        StableOptCallback(every_n_steps=0)


def test_missing_lightning_names_the_extra(monkeypatch: Any) -> None:
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    monkeypatch.delitem(sys.modules, "stableopt.integrations.lightning")
    with pytest.raises(ImportError, match=r"stableopt\[lightning\]"):
        importlib.import_module("stableopt.integrations.lightning")


class BatchNormRegression(pl.LightningModule):
    """A BatchNorm net whose input holds a NaN on chosen optimizer steps (0-based)."""

    def __init__(self, nan_steps: tuple[int, ...] = ()) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1))
        self.nan_steps = set(nan_steps)
        self.buffers_before: dict[int, list[torch.Tensor]] = {}
        self.buffers_after: dict[int, list[torch.Tensor]] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step in self.nan_steps:
            x = x.clone()
            x[0, 0] = float("nan")
        return nn.functional.mse_loss(self.net(x), y)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.buffers_before[self.global_step] = [b.clone() for b in self.buffers()]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.buffers_after[self.global_step - 1] = [b.clone() for b in self.buffers()]

    def configure_optimizers(self) -> Any:
        self.safe = SafeOptimizer(torch.optim.AdamW(self.parameters(), lr=1e-2))
        return self.safe


def test_a_skipped_nan_batch_leaves_the_batchnorm_statistics_as_they_were(tmp_path: Any) -> None:
    """The forward runs inside Lightning's closure: the running statistics it wrote go back."""
    model = BatchNormRegression(nan_steps=(3,))
    trainer = make_trainer(tmp_path)
    trainer.fit(model, loader())
    assert model.safe.stats()["skipped_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(model.buffers_before[3], model.buffers_after[3]))
    assert not torch.equal(model.buffers_before[2][0], model.buffers_after[2][0])
    model.eval()
    assert torch.isfinite(model.net(torch.randn(8, 4))).all()

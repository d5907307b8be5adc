"""Hugging Face Trainer integration: a real Trainer on a tiny GPT-2 built from a config."""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
from typing import Any, cast

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from packaging.version import Version  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from stableopt import SafeOptimizer  # noqa: E402
from stableopt.integrations import find_safe_optimizer  # noqa: E402
from stableopt.integrations.hf import StableOptCallback, safe_optimizers  # noqa: E402

VOCAB = 128
SEQ = 16
#: transformers < 4.51 cannot load its own rng_state.pth under torch >= 2.6 (weights_only).
_OLD_RNG_LOAD = Version(transformers.__version__) < Version("4.51") and Version(
    torch.__version__
) >= Version("2.6")

#: The metric names every training log carries (``clip_threshold`` once it is finite).
METRIC_NAMES = tuple(
    "stableopt/" + name
    for name in (
        "system_health",
        "emergency_mode",
        "total_clips",
        "emergency_clips",
        "lr_changes",
        "skipped_steps",
        "rollbacks",
        "size_mismatches",
        "grad_norm",
        "lr_factor",
    )
)


class FaultyGPT2(GPT2LMHeadModel):
    """GPT-2 whose training loss is NaN on chosen forward calls (1-based) and scaled."""

    def __init__(self, config: GPT2Config, nan_calls: tuple[int, ...] = (), scale: float = 1.0):
        super().__init__(config)
        self.nan_calls = set(nan_calls)
        self.scale = scale
        self.calls = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = super().forward(*args, **kwargs)
        if self.training and out.loss is not None:
            self.calls += 1
            loss = out.loss * self.scale
            out.loss = loss * float("nan") if self.calls in self.nan_calls else loss
        return out


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.data = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i], "labels": self.data[i]}


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(**kwargs: Any) -> FaultyGPT2:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=64)
    return FaultyGPT2(config, **kwargs)


def make_args(tmp_path: Any, **kwargs: Any) -> TrainingArguments:
    defaults: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        warmup_steps=2,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=0,
    )
    return TrainingArguments(**{**defaults, **kwargs})


def reference_lrs(lr: float, steps: int, warmup: int) -> list[float]:
    """The LR of each update under Trainer's linear schedule, replayed on a plain SGD."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = transformers.get_scheduler(
        "linear", opt, num_warmup_steps=warmup, num_training_steps=steps
    )
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_trainer_end_to_end_with_callback_metrics(tmp_path: Any) -> None:
    model = make_model()
    safe = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    callback = StableOptCallback()
    args = make_args(tmp_path)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(),
        optimizers=(safe, None),
        callbacks=[callback],
    )
    assert trainer.callback_handler.callbacks[0] is callback  # before every reporter
    trainer.train()
    assert args.max_grad_norm == 0.0  # our clip is on: Trainer's is off
    assert safe.stats()["steps"] == 6 and safe.stats()["skipped_steps"] == 0
    assert safe.stats()["loss"] is not None  # the forward hook reports the loss
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(train_logs) == 6
    for entry in train_logs:
        assert set(METRIC_NAMES) <= set(entry), sorted(entry)
        assert entry["stableopt/skipped_steps"] == 0.0
        # transformers 5 logs its own pre-clip norm (accelerate's clip_grad_norm_ at inf)
        if "grad_norm" in entry:
            assert entry["stableopt/grad_norm"] == pytest.approx(entry["grad_norm"], rel=1e-5)
    assert train_logs[-1]["stableopt/loss"] == pytest.approx(safe.stats()["loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_accelerate_keeps_param_groups_and_scheduled_lr(tmp_path: Any) -> None:
    model = make_model()
    safe = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), clip=None)
    used: list[float] = []
    safe.optimizer.register_step_pre_hook(lambda o, a, k: used.append(o.param_groups[0]["lr"]))
    trainer = Trainer(
        model=model,
        args=make_args(tmp_path),
        train_dataset=Tokens(),
        optimizers=(safe, None),
        callbacks=[StableOptCallback()],
    )
    trainer.train()
    wrapped: Any = trainer.optimizer
    assert type(wrapped).__name__ == "AcceleratedOptimizer"
    assert wrapped.optimizer is safe
    assert wrapped.param_groups is safe.param_groups is safe.optimizer.param_groups
    assert find_safe_optimizer(cast(Any, trainer.lr_scheduler).optimizer) is safe
    assert used == pytest.approx(reference_lrs(1e-3, 6, 2))


def test_a_skipped_step_is_skipped_for_the_trainer_and_its_schedule_waits(tmp_path: Any) -> None:
    """Trainer reads ``accelerator.optimizer_step_was_skipped`` before it steps its LR
    scheduler: after our skip, as after GradScaler's, the schedule waits for the next update."""
    model = make_model(nan_calls=(3,))
    safe = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    seen: list[tuple[float, float]] = []  # (scheduled LR, our factor) before each step
    used: list[float] = []
    safe.register_step_pre_hook(
        lambda o, a, k: seen.append((o.param_groups[0]["lr"], safe.lr_factor))
    )
    safe.optimizer.register_step_pre_hook(lambda o, a, k: used.append(o.param_groups[0]["lr"]))
    trainer = Trainer(
        model=model,
        args=make_args(tmp_path, max_steps=8),
        train_dataset=Tokens(),
        optimizers=(safe, None),
        callbacks=[StableOptCallback()],
    )
    trainer.train()
    stats = safe.stats()
    assert stats["steps"] == 8 and stats["skipped_steps"] == 1
    assert trainer.state.global_step == 8  # Trainer counts the step; the update did not run
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the schedule counted the 7 updates that ran: step 4 uses the LR step 3 would have
    assert cast(Any, trainer.lr_scheduler).last_epoch == 7
    reference = reference_lrs(1e-3, 8, 2)
    assert [s for s, _ in seen] == pytest.approx(reference[:3] + reference[2:7])
    assert len(used) == 7 and used == pytest.approx(reference[:7])
    # one isolated bad batch: skipped, no LR cut (EmergencyLR cuts when triggers repeat)
    assert all(f == 1.0 for _, f in seen)
    skips = [h["stableopt/skipped_steps"] for h in trainer.state.log_history if "loss" in h]
    assert skips == [0, 0, 1, 1, 1, 1, 1, 1]


def test_trainer_clip_is_off_and_grad_norm_is_pre_clip(tmp_path: Any) -> None:
    model = make_model(scale=50.0)  # gradient norms well above Trainer's max_grad_norm=1.0
    safe = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), clip=0.5)
    received: list[float] = []
    recorded: list[float] = []

    def total_norm(o: Any, a: Any, k: Any) -> None:
        grads = [p.grad for g in o.param_groups for p in g["params"] if p.grad is not None]
        received.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    safe.register_step_pre_hook(total_norm)  # sees the gradients exactly as Trainer hands them
    safe.register_step_post_hook(lambda o, a, k: recorded.append(safe.stats()["grad_norm"]))
    args = make_args(tmp_path, max_steps=4)
    assert args.max_grad_norm == 1.0
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(),
        optimizers=(safe, None),
        callbacks=[StableOptCallback()],
    )
    trainer.train()
    assert args.max_grad_norm == 0.0
    assert min(received) > 1.0  # Trainer did not clip them to 1.0
    assert recorded == pytest.approx(received, rel=1e-4)
    assert safe.stats()["total_clips"] == 4
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["stableopt/grad_norm"] for h in train_logs] == pytest.approx(received, rel=1e-4)
    assert all(h["stableopt/clip_threshold"] == 0.5 for h in train_logs)


@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")  # mlflow's SQLAlchemy
def test_mlflow_gets_our_metrics_in_the_same_run(tmp_path: Any, monkeypatch: Any) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"  # mlflow 3 refuses file: stores
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "stableopt-hf")
    monkeypatch.delenv("DISABLE_MLFLOW_INTEGRATION", raising=False)
    import mlflow

    mlflow.set_tracking_uri(uri)
    model = make_model(nan_calls=(2,))
    safe = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    trainer = Trainer(
        model=model,
        args=make_args(tmp_path, max_steps=4, report_to=["mlflow"]),
        train_dataset=Tokens(),
        optimizers=(safe, None),
        callbacks=[StableOptCallback()],
    )
    trainer.train()
    if mlflow.active_run() is not None:
        mlflow.end_run()
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("stableopt-hf")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    assert "loss" in metrics
    for name in ("stableopt/skipped_steps", "stableopt/grad_norm", "stableopt/system_health"):
        assert name in metrics, sorted(metrics)
    history = client.get_metric_history(runs[0].info.run_id, "stableopt/skipped_steps")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.0), (2, 1.0), (3, 1.0), (4, 1.0)]


@pytest.mark.skipif(
    _OLD_RNG_LOAD,
    reason="this transformers cannot load its own rng_state.pth under torch>=2.6 "
    "(transformers#34631, fixed in 4.51)",
)
def test_resume_from_checkpoint_continues_counters(tmp_path: Any) -> None:
    def run(max_steps: int, resume: str | None = None) -> tuple[SafeOptimizer, Trainer]:
        # fresh model, optimizer, callback and Trainer for each run
        # a NaN loss at step 2, before the checkpoint (a resumed model counts calls from 0)
        model = make_model(nan_calls=() if resume else (2,))
        safe = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
        trainer = Trainer(
            model=model,
            args=make_args(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=3),
            train_dataset=Tokens(),
            optimizers=(safe, None),
            callbacks=[StableOptCallback()],
        )
        trainer.train(resume_from_checkpoint=resume)
        return safe, trainer

    full, full_trainer = run(6)
    checkpoint = tmp_path / "out" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").is_file()
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert saved["stableopt"]["monitor"]["counters"]["steps"] == 3
    resumed, trainer = run(6, resume=str(checkpoint))
    keys = ("steps", "good_steps", "skipped_steps", "lr_changes", "total_clips", "lr_factor")
    assert {k: resumed.stats()[k] for k in keys} == {k: full.stats()[k] for k in keys}
    assert resumed.stats()["steps"] == 6 and resumed.stats()["skipped_steps"] == 1
    assert trainer.state.global_step == 6
    assert resumed.optimizer.state_dict()["state"][0]["step"] == 5  # 6 steps, 1 skipped
    resumed_model, full_model = cast(Any, trainer.model), cast(Any, full_trainer.model)
    for (name, p), q in zip(resumed_model.named_parameters(), full_model.parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_safe_loss_as_compute_loss_func(tmp_path: Any) -> None:
    SafeLoss = pytest.importorskip("stableopt.loss").SafeLoss
    if "compute_loss_func" not in inspect.signature(Trainer.__init__).parameters:
        pytest.skip(f"compute_loss_func is new in transformers 4.46 ({transformers.__version__})")
    model = make_model()
    safe = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))

    def lm_loss(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
        logits = outputs.logits[:, :-1].reshape(-1, VOCAB)
        return torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1))

    loss_fn = SafeLoss(lm_loss, optimizer=safe)
    trainer = Trainer(
        model=model,
        args=make_args(tmp_path, max_steps=3),
        train_dataset=Tokens(),
        optimizers=(safe, None),
        compute_loss_func=loss_fn,
        callbacks=[StableOptCallback()],
    )
    trainer.train()
    assert safe.stats()["steps"] == 3
    assert safe.stats()["loss"] is not None and math.isfinite(safe.stats()["loss"])
    assert loss_fn.stats()["nonfinite_losses"] == 0


def test_safe_optimizers_builds_what_trainer_would(tmp_path: Any) -> None:
    hyper = dict(max_steps=5, weight_decay=0.1, adam_beta1=0.8, adam_epsilon=1e-7)
    # the reference: what Trainer builds itself from the same arguments
    reference = Trainer(model=make_model(), args=make_args(tmp_path, **hyper))
    ref_opt = reference.create_optimizer()
    ref_sched = reference.create_scheduler(5, ref_opt)
    ref_lrs = []
    for _ in range(5):
        ref_lrs.append(ref_sched.get_last_lr()[0])
        ref_opt.step()
        ref_sched.step()

    model = make_model()
    args = make_args(tmp_path, **hyper)
    opt, sched = safe_optimizers(model, args, clip=1.0)
    assert isinstance(opt, SafeOptimizer) and sched.optimizer is opt
    assert type(opt.optimizer) is type(ref_opt)
    assert args.max_grad_norm == 0.0  # our clip is on: Trainer's is off

    def names(optimizer: Any, module: torch.nn.Module) -> list[list[str]]:
        by_id = {id(p): n for n, p in module.named_parameters()}
        return [sorted(by_id[id(p)] for p in g["params"]) for g in optimizer.param_groups]

    def settings(optimizer: Any) -> list[dict[str, Any]]:
        return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]

    assert names(opt, model) == names(ref_opt, cast(Any, reference.model))
    assert settings(opt) == settings(ref_opt)  # lr, betas, eps, weight decay, fused, ...
    assert opt.param_groups[1]["weight_decay"] == 0.0 and opt.param_groups[0]["betas"][0] == 0.8

    used: list[float] = []
    opt.optimizer.register_step_pre_hook(lambda o, a, k: used.append(o.param_groups[0]["lr"]))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(),
        optimizers=(opt, sched),
        callbacks=[StableOptCallback()],
    )
    trainer.train()
    assert opt.stats()["steps"] == 5 and opt.stats()["skipped_steps"] == 0
    assert used == pytest.approx(ref_lrs)
    with pytest.raises(ValueError, match="num_training_steps"):
        safe_optimizers(model, make_args(tmp_path, max_steps=-1))
    with pytest.raises(TypeError, match="TrainingArguments"):
        safe_optimizers(model, {"learning_rate": 1e-3})  # type: ignore[arg-type]


def test_callback_rejects_a_plain_optimizer_argument() -> None:
    with pytest.raises(TypeError, match="SafeOptimizer"):
        StableOptCallback(optimizer=torch.optim.SGD([torch.zeros(1)], lr=0.1))  # type: ignore[arg-type]


def test_missing_transformers_names_the_extra(monkeypatch: Any) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "stableopt.integrations.hf")
    with pytest.raises(ImportError, match=r"stableopt\[hf\]"):
        importlib.import_module("stableopt.integrations.hf")


class BatchNormRegressor(torch.nn.Module):
    """Not a transformers model: the Trainer takes any module whose output has a ``loss``."""

    def __init__(self, nan_calls: tuple[int, ...] = ()) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(SEQ, 16),
            torch.nn.BatchNorm1d(16),
            torch.nn.Tanh(),
            torch.nn.Linear(16, 1),
        )
        self.nan_calls = set(nan_calls)
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        x = input_ids.float() / VOCAB
        if self.training:
            self.calls += 1
            if self.calls in self.nan_calls:
                x = x.clone()
                x[0, 0] = float("nan")
        loss = torch.nn.functional.mse_loss(
            self.net(x), labels.float().mean(1, keepdim=True) / VOCAB
        )
        return {"loss": loss}


def test_a_skipped_nan_batch_leaves_the_batchnorm_statistics_finite(tmp_path: Any) -> None:
    model = BatchNormRegressor(nan_calls=(3,))
    opt = SafeOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    trainer = Trainer(
        model=model, args=make_args(tmp_path), train_dataset=Tokens(), optimizers=(opt, None)
    )
    trainer.train()
    assert opt.stats()["skipped_steps"] == 1
    assert [e.kind for e in opt.events() if e.step == 3][:2] == ["skip", "buffers_restored"]
    assert all(torch.isfinite(b.float()).all() for b in model.buffers())
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model.net(torch.rand(4, SEQ))).all()

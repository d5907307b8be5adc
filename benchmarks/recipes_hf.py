"""A tiny GPT-2 trained through the real ``transformers.Trainer`` on the standard library.

Reproduces the Hugging Face causal-LM recipe (``examples/pytorch/language-modeling/
run_clm.py`` with ``--config_overrides``, no pretrained weights): a ``GPT2LMHeadModel``
built from a ``GPT2Config`` (its default dropouts 0.1, tied embeddings), the text
concatenated and cut into blocks (``group_texts``, labels = input ids, the model shifts
them), trained by ``Trainer`` with its defaults: the AdamW of ``args.optim``
(``adamw_torch_fused`` in transformers 5; betas (0.9, 0.999), eps 1e-8, no weight
decay), the linear schedule with warm-up, ``max_grad_norm=1.0`` (Trainer's own clip),
the Trainer's shuffling sampler seeded by ``args.seed``. Text: the standard library's
source (:func:`benchmarks.tasks_text.corpus`), one token per character (the 98 ids of
:func:`benchmarks.tasks_text.encode`).

The SafeOptimizer variants enter as ``Trainer(optimizers=(SafeOptimizer(AdamW(...)),
scheduler))`` with the optimizer and schedule Trainer would build (``Trainer.get_optimizer_cls_and_kwargs``,
its decay groups, ``transformers.get_scheduler``), and get the training loss through
:class:`stableopt.integrations.hf.StableOptCallback` (a forward hook hands
``outputs.loss`` to ``opt.observe_loss``): the natural route with Trainer, whose loss is
computed inside the model. Where the variant keeps the user's clip, the callback leaves
``max_grad_norm=1.0`` on (``disable_trainer_clipping=False``); where it removes it,
``max_grad_norm=0``.

Scaled down: 2 layers, hidden 64, 4 heads, blocks of 64 tokens, batch 16, peak LR 1e-3
(Trainer's 5e-5 is a fine-tuning LR; this model starts from scratch), warm-up 10% of
the run. The held-out loss is the model's own loss on 128 fixed blocks of the held-out
text, in ``eval()`` mode. Needs ``transformers`` and ``accelerate``; nothing is
downloaded (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from benchmarks.recipes_base import (
    BATCH_FAULTS,
    RecipeRun,
    RunOutcome,
    StepLog,
    TokenBatch,
    Wrap,
    check_steps,
    describe_error,
    embedding_fault,
    fault_step,
)
from benchmarks.tasks_text import VOCAB, corpus
from stableopt import SafeOptimizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import transformers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from stableopt.integrations.hf import StableOptCallback  # noqa: E402

__all__ = ["HFRecipe", "HFRun", "build_hf"]

_STRIDE = 1_000_003


@dataclass(frozen=True)
class HFRecipe:
    """The model config and the ``TrainingArguments`` that differ from Trainer's defaults."""

    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    block_size: int = 64
    batch_size: int = 16  # per_device_train_batch_size
    learning_rate: float = 1e-3
    warmup_share: float = 0.1
    max_grad_norm: float = 1.0  # Trainer's default
    held_out_blocks: int = 128
    steps: int = 80


class _Blocks(torch.utils.data.Dataset[dict[str, Tensor]]):
    """``group_texts``: the text cut into blocks; labels are the input ids."""

    def __init__(self, ids: Tensor, block_size: int) -> None:
        n = len(ids) // block_size
        self.blocks = ids[: n * block_size].view(n, block_size)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


class _Watch(transformers.TrainerCallback):
    """The batch fault at its step (a hook on the input embeddings), and what
    SafeOptimizer did at every step."""

    def __init__(self, run: HFRun, fault: str, bad_step: int) -> None:
        self.run, self.fault, self.bad_step = run, fault, bad_step
        self.context: Any = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step + 1 == self.bad_step:
            embedding = self.run.model.get_input_embeddings()
            self.context = embedding_fault(embedding, self.fault)
            self.context.__enter__()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.context is not None:
            self.context.__exit__(None, None, None)
            self.context = None
        self.run.log.observe(self.run.safe)


class HFRun(RecipeRun):
    """One Trainer run on one seed (see the module docstring)."""

    def __init__(
        self,
        recipe: HFRecipe,
        seed: int,
        *,
        wrap: Wrap | None,
        keep_clip: bool,
        steps: int,
        lr: float,
        output_dir: str,
    ) -> None:
        self.recipe, self.seed = recipe, seed
        self.steps, self.lr = check_steps(steps), lr
        self.clip, self.keep_clip = recipe.max_grad_norm, keep_clip
        self.log = StepLog()
        torch.manual_seed(seed)
        config = GPT2Config(
            vocab_size=VOCAB,
            n_positions=recipe.block_size,
            n_embd=recipe.n_embd,
            n_layer=recipe.n_layer,
            n_head=recipe.n_head,
        )
        self.model: GPT2LMHeadModel = GPT2LMHeadModel(config)
        self.args = TrainingArguments(
            output_dir,
            max_steps=steps,
            per_device_train_batch_size=recipe.batch_size,
            learning_rate=lr,
            warmup_steps=max(1, round(recipe.warmup_share * steps)),
            max_grad_norm=recipe.max_grad_norm if keep_clip else 0.0,
            seed=seed,
            logging_steps=1,  # Trainer's grad_norm of every step, to count its clips
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            dataloader_pin_memory=False,
        )
        train, _ = corpus()
        self.train_set = _Blocks(train, recipe.block_size)
        self.safe: SafeOptimizer | None = None
        optimizers: tuple[Any, Any] = (None, None)
        callbacks: list[transformers.TrainerCallback] = []
        if wrap is not None:
            wrapped = wrap(_trainer_optimizer(self.model, self.args))
            if not isinstance(wrapped, SafeOptimizer):
                raise TypeError(f"wrap must return a SafeOptimizer, got {type(wrapped).__name__}")
            self.safe = wrapped
            scheduler = transformers.get_scheduler(
                self.args.lr_scheduler_type,
                optimizer=wrapped,
                num_warmup_steps=self.args.get_warmup_steps(steps),
                num_training_steps=steps,
            )
            optimizers = (wrapped, scheduler)
            # its forward hook reports the loss; the user's clip line is max_grad_norm
            callbacks.append(StableOptCallback(disable_trainer_clipping=False))
        self.trainer = Trainer(
            model=self.model,
            args=self.args,
            train_dataset=self.train_set,
            optimizers=optimizers,
            callbacks=callbacks,
        )
        self.trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # no prints
        self.trainer.create_optimizer_and_scheduler(num_training_steps=steps)
        assert self.trainer.optimizer is not None and self.trainer.lr_scheduler is not None
        self.optimizer = self.trainer.optimizer
        self.inner = self.safe.optimizer if self.safe is not None else self.optimizer
        self.scheduler = self.trainer.lr_scheduler

    # -- one iteration, for callers that drive it themselves ---------------------------

    def batch(self, step: int) -> TokenBatch:
        g = torch.Generator().manual_seed(self.seed * _STRIDE + step)
        index = torch.randint(0, len(self.train_set), (self.recipe.batch_size,), generator=g)
        blocks = self.train_set.blocks[index]
        return TokenBatch(blocks, blocks)

    def corrupt(self, batch: TokenBatch, kind: str) -> TokenBatch:
        return batch._replace(fault=kind)

    def train_step(self, batch: TokenBatch) -> Tensor:
        """One iteration of Trainer's inner loop on ``batch``, written out: what
        ``training_step`` does without gradient accumulation (``model.train()``, the
        model's own loss, ``backward``), the clip to ``max_grad_norm`` when on,
        ``optimizer.step()``, the scheduler unless the step was skipped, ``zero_grad``.
        (``Trainer.training_step`` reads state that only ``train()`` sets up.)
        :meth:`run` trains through ``trainer.train()`` itself."""
        self.model.train()
        with embedding_fault(self.model.get_input_embeddings(), batch.fault):
            loss = self.model(input_ids=batch.tokens, labels=batch.targets).loss
        loss.backward()
        if self.args.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
            self.own_clips += bool(norm > self.args.max_grad_norm)
        self.optimizer.step()
        if self.safe is None or not self.safe.step_was_skipped:
            self.scheduler.step()
        self.model.zero_grad()
        return loss.detach()

    def held_out_loss(self) -> float:
        _, held = corpus()
        block = self.recipe.block_size
        starts = torch.linspace(0, len(held) - block - 1, self.recipe.held_out_blocks).long()
        x = held[starts[:, None] + torch.arange(block)[None, :]]
        return float(self.model(input_ids=x, labels=x).loss)

    # -- the whole run, through Trainer --------------------------------------------------

    def run(self, fault: str = "healthy", steps: int | None = None) -> RunOutcome:
        """``trainer.train()`` for the run's ``max_steps`` (``steps`` must be the run's own)."""
        if steps is not None and steps != self.steps:
            raise ValueError(f"an HF run trains for its max_steps ({self.steps}), got {steps}")
        bad_step = fault_step(self.steps) if fault in BATCH_FAULTS else 0
        self.trainer.add_callback(_Watch(self, fault, bad_step))
        initial = self.evaluate()
        error = ""
        started = time.perf_counter()
        try:
            self.trainer.train()
        except Exception as exc:  # a DivergenceError, or a crash: recorded, not raised
            error = describe_error(exc, self.trainer.state.global_step + 1)
        seconds = time.perf_counter() - started
        norms = [e["grad_norm"] for e in self.trainer.state.log_history if "grad_norm" in e]
        own = (
            sum(1 for n in norms if n > self.args.max_grad_norm)
            if self.args.max_grad_norm > 0
            else -1
        )
        return RunOutcome(
            initial, self.evaluate(), self.trainer.state.global_step, error, seconds, own, self.log
        )


def _trainer_optimizer(model: torch.nn.Module, args: TrainingArguments) -> Optimizer:
    """The optimizer ``Trainer.create_optimizer`` builds from ``args``: the class and
    arguments of ``args.optim``, weight decay on the parameters Trainer decays."""
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)  # type: ignore[arg-type]
    decay = set(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    return optimizer_cls([g for g in groups if g["params"]], **kwargs)  # type: ignore[no-any-return]


def build_hf(
    seed: int = 0,
    *,
    wrap: Wrap | None = None,
    keep_clip: bool = True,
    steps: int | None = None,
    lr: float | None = None,
    recipe: HFRecipe | None = None,
    output_dir: str | None = None,
    **options: Any,
) -> HFRun:
    """The Trainer run on ``seed``: ``wrap`` the optimizer (it must return a
    SafeOptimizer), keep Trainer's ``max_grad_norm`` or set it to 0; ``lr`` (default
    1e-3), ``steps`` (``max_steps``); ``options`` override :class:`HFRecipe` fields.
    ``output_dir`` defaults to a fresh temporary folder (nothing is saved in it)."""
    recipe = replace(recipe or HFRecipe(), **options)
    return HFRun(
        recipe,
        seed,
        wrap=wrap,
        keep_clip=keep_clip,
        steps=recipe.steps if steps is None else steps,
        lr=recipe.learning_rate if lr is None else lr,
        output_dir=output_dir or tempfile.mkdtemp(prefix="stableopt-hf-"),
    )

"""nanoGPT's character-level recipe, scaled down to run on a CPU core.

Reproduces karpathy/nanoGPT ``config/train_shakespeare_char.py`` with ``train.py`` and
``model.py``: a GPT of pre-LayerNorm blocks (causal self-attention through
``scaled_dot_product_attention``, a GELU MLP, dropout on the embeddings, the attention
and the residual branches), no biases (``bias=False``, train.py's default), the token
embedding tied to the output head, GPT-2 initialisation (normal 0.02, residual
projections scaled by ``1/sqrt(2 n_layer)``); AdamW with betas (0.9, 0.99) in the two
groups of ``configure_optimizers`` (weight decay 0.1 on parameters of 2 or more dims,
0 on the rest); ``get_lr``: linear warm-up, cosine decay to ``min_lr`` (lr 1e-3, min_lr
1e-4), written into every ``param_group["lr"]`` before each iteration; the GradScaler
path of train.py (``scaler.scale(loss).backward(); scaler.unscale_(opt);
clip_grad_norm_(model.parameters(), 1.0); scaler.step(opt); scaler.update();
opt.zero_grad(set_to_none=True)``) with ``torch.amp.GradScaler(enabled=False)``, which
is what train.py runs on a CPU in float32. Batches are random windows of the training
text (train.py's ``get_batch``), here the standard library's source
(:func:`benchmarks.tasks_text.corpus`), character-level.

Scaled down: 2 layers, 4 heads, n_embd 64, block 64, batch 16 (the config: 6, 6, 384,
256, 64), the warm-up 2% of the run (100 of 5000 iterations) and the cosine over the
run; the held-out loss is read on 128 fixed windows of the held-out text instead of 200
random batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.optim import Optimizer

from benchmarks.recipes_base import (
    RecipeRun,
    TokenBatch,
    Wrap,
    apply_wrap,
    check_steps,
    embedding_fault,
)
from benchmarks.tasks_text import VOCAB, corpus

__all__ = ["GPT", "GPTConfig", "NanoGPTRecipe", "NanoGPTRun", "build_nanogpt"]

_STRIDE = 1_000_003


@dataclass(frozen=True)
class GPTConfig:
    """model.py's ``GPTConfig``, at the benchmark's scale."""

    block_size: int = 64
    vocab_size: int = VOCAB
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.2  # train_shakespeare_char.py
    bias: bool = False  # train.py's default


class _LayerNorm(nn.Module):
    """LayerNorm with an optional bias (model.py's ``LayerNorm``)."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class _CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_dropout(self.c_proj(y))  # type: ignore[no-any-return]


class _MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # type: ignore[no-any-return]


class _Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = _LayerNorm(config.n_embd, config.bias)
        self.attn = _CausalSelfAttention(config)
        self.ln_2 = _LayerNorm(config.n_embd, config.bias)
        self.mlp = _MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))  # type: ignore[no-any-return]


class GPT(nn.Module):
    """model.py's ``GPT``: ``forward(idx, targets)`` returns ``(logits, loss)``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.n_embd),
                "wpe": nn.Embedding(config.block_size, config.n_embd),
                "drop": nn.Dropout(config.dropout),
                "h": nn.ModuleList([_Block(config) for _ in range(config.n_layer)]),
                "ln_f": _LayerNorm(config.n_embd, config.bias),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer["wte"].weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        t = idx.shape[1]
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        h = self.transformer
        x = h["drop"](h["wte"](idx) + h["wpe"](pos))
        for block in cast(nn.ModuleList, h["h"]):
            x = block(x)
        logits = self.lm_head(h["ln_f"](x))
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(
        self, weight_decay: float, learning_rate: float, betas: tuple[float, float]
    ) -> Optimizer:
        """model.py's optimizer: AdamW, weight decay on the tensors of >= 2 dims only."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # model.py asks for fused=True only on CUDA: the default implementation on a CPU.
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)


@dataclass(frozen=True)
class NanoGPTRecipe:
    """The hyper-parameters of ``train_shakespeare_char.py`` + ``train.py`` (scaled)."""

    model: GPTConfig = GPTConfig()
    batch_size: int = 16
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_share: float = 0.02  # warmup_iters 100 of max_iters 5000
    steps: int = 120
    held_out_windows: int = 128


class NanoGPTRun(RecipeRun):
    """nanoGPT's training loop on one seed (see the module docstring)."""

    def __init__(
        self,
        recipe: NanoGPTRecipe,
        seed: int,
        *,
        wrap: Wrap | None,
        keep_clip: bool,
        steps: int,
        lr: float,
    ) -> None:
        self.recipe, self.seed = recipe, seed
        self.steps, self.lr = check_steps(steps), lr
        # min_lr follows the peak (1e-4 = 1e-3 / 10 in the config)
        self.min_lr = recipe.min_lr * lr / recipe.learning_rate
        self.clip, self.keep_clip = recipe.grad_clip, keep_clip
        torch.manual_seed(seed)  # the weights, then dropout
        self.model: GPT = GPT(recipe.model)
        self.inner = self.model.configure_optimizers(
            recipe.weight_decay, lr, (recipe.beta1, recipe.beta2)
        )
        self.optimizer, self.safe = apply_wrap(self.inner, wrap)
        self.scaler = torch.amp.GradScaler(enabled=False)  # train.py on a CPU, float32
        self.warmup_iters = max(1, round(recipe.warmup_share * steps))
        self.iter_num = 0
        self.model.train()

    def get_lr(self, it: int) -> float:
        """train.py's ``get_lr``: linear warm-up, cosine decay to ``min_lr``."""
        if it < self.warmup_iters:
            return self.lr * (it + 1) / (self.warmup_iters + 1)
        if it > self.steps:
            return self.min_lr
        ratio = (it - self.warmup_iters) / max(1, self.steps - self.warmup_iters)
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
        return self.min_lr + coeff * (self.lr - self.min_lr)

    def _windows(self, ids: Tensor, starts: Tensor) -> TokenBatch:
        block = self.recipe.model.block_size
        index = starts[:, None] + torch.arange(block + 1)[None, :]
        chunk = ids[index]
        return TokenBatch(chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous())

    def batch(self, step: int) -> TokenBatch:
        """``get_batch("train")``: random windows, drawn from ``(seed, step)``."""
        train, _ = corpus()
        generator = torch.Generator().manual_seed(self.seed * _STRIDE + step)
        block = self.recipe.model.block_size
        starts = torch.randint(
            0, len(train) - block - 1, (self.recipe.batch_size,), generator=generator
        )
        return self._windows(train, starts)

    def corrupt(self, batch: TokenBatch, kind: str) -> TokenBatch:
        return batch._replace(fault=kind)  # applied to the embedded tokens

    def train_step(self, batch: TokenBatch) -> Tensor:
        """One iteration of train.py (LR write, forward, scaled backward, clip, step)."""
        lr = self.get_lr(self.iter_num)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with embedding_fault(self.model.transformer["wte"], batch.fault):
            _, loss = self.model(batch.tokens, batch.targets)
        if self.safe is not None:
            # the loss is computed inside model.forward: reported, not wrapped
            self.safe.observe_loss(loss.detach())
        self.scaler.scale(loss).backward()
        if self.keep_clip and self.clip != 0.0:
            self.scaler.unscale_(self.optimizer)
            self.clip_line(self.model.parameters())
        self.iter_num += 1  # before the step: a DivergenceError ends the run anyway
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def held_out_loss(self) -> float:
        _, held = corpus()
        block = self.recipe.model.block_size
        starts = torch.linspace(0, len(held) - block - 1, self.recipe.held_out_windows).long()
        x, y, _ = self._windows(held, starts)
        return float(self.model(x, y)[1])


def build_nanogpt(
    seed: int = 0,
    *,
    wrap: Wrap | None = None,
    keep_clip: bool = True,
    steps: int | None = None,
    lr: float | None = None,
    recipe: NanoGPTRecipe | None = None,
    **model: Any,
) -> NanoGPTRun:
    """nanoGPT's run on ``seed``: ``wrap`` the optimizer, keep or drop ``clip_grad_norm_``.

    ``lr`` is the peak LR (default the recipe's 1e-3; ``min_lr`` follows as lr / 10),
    ``steps`` the run length (the schedule is laid out over it); ``model`` overrides
    fields of :class:`GPTConfig` (``n_layer=2``, ...).
    """
    recipe = recipe or NanoGPTRecipe()
    if model:
        recipe = replace(recipe, model=replace(recipe.model, **model))
    return NanoGPTRun(
        recipe,
        seed,
        wrap=wrap,
        keep_clip=keep_clip,
        steps=recipe.steps if steps is None else steps,
        lr=recipe.learning_rate if lr is None else lr,
    )

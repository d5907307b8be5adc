"""OpenNMT-py's default RNN recipe, scaled down: reverse character chunks of real text.

Reproduces the defaults of OpenNMT-py's ``onmt/opts.py`` (``-encoder_type rnn
-decoder_type rnn -rnn_type LSTM -layers 2 -global_attention general -input_feed 1
-optim sgd -learning_rate 1 -max_grad_norm 5 -dropout 0.3 -learning_rate_decay 0.5
-start_decay_steps 50000 -decay_steps 10000 -train_steps 100000 -param_init 0.1
-normalization sents``): embeddings with dropout 0.3; a 2-layer unidirectional LSTM
encoder over the packed source (dropout 0.3 between layers); an input-feeding decoder
of two stacked LSTM cells (dropout 0.3 between them) started from the encoder's final
states, Luong's "general" global attention (``score = h_t^T W_a h_s``, padded source steps masked, ``tanh(W_c [c_t;
h_t])`` without bias), dropout 0.3 on its output, which is fed to the next step; a
generator ``Linear + LogSoftmax``; ``NLLLoss(ignore_index=pad, reduction="sum")``
divided by the number of sentences; every parameter uniform in (-0.1, 0.1); plain SGD
(lr 1.0), ``clip_grad_norm_(params, 5)`` inside the optimizer's step, and the LR halved
at 50% of the run and every further 10% (``exponential_decay`` of
``onmt.utils.optimizers``).

The data: the source is a chunk of 4-8 characters of the standard library's source
(:func:`benchmarks.tasks_text.corpus`), the target the same chunk reversed, between
BOS and EOS. Scaled down: embeddings 32 and LSTMs 64 (opts.py: 500 and 500), batch 32
sentences (64). The held-out loss is the NLL per target token of 256 fixed chunks of
the held-out text, teacher-forced, in ``eval()`` mode.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from benchmarks.recipes_base import (
    RecipeRun,
    Wrap,
    apply_wrap,
    check_steps,
    embedding_fault,
)
from benchmarks.tasks_text import VOCAB, corpus
from stableopt import SafeLoss

__all__ = ["PAD", "Seq2SeqBatch", "Seq2SeqModel", "Seq2SeqRecipe", "Seq2SeqRun", "build_seq2seq"]

PAD, BOS, EOS = VOCAB, VOCAB + 1, VOCAB + 2
_VOCAB = VOCAB + 3
_STRIDE = 1_000_003


@dataclass(frozen=True)
class Seq2SeqRecipe:
    """opts.py's defaults (scaled sizes) and the data's."""

    word_vec_size: int = 32  # 500
    rnn_size: int = 64  # 500
    layers: int = 2
    dropout: float = 0.3
    param_init: float = 0.1
    learning_rate: float = 1.0
    max_grad_norm: float = 5.0
    learning_rate_decay: float = 0.5
    start_decay_share: float = 0.5  # start_decay_steps 50000 of train_steps 100000
    decay_share: float = 0.1  # decay_steps 10000
    batch_size: int = 32  # 64
    min_chars: int = 4
    max_chars: int = 8
    held_out_chunks: int = 256
    steps: int = 100


class Seq2SeqBatch(NamedTuple):
    src: Tensor  # (B, S) character ids, PAD-padded
    src_lengths: Tensor  # (B,)
    tgt: Tensor  # (B, T + 1): BOS, reversed chunk, EOS, PAD-padded
    fault: str = ""  # a batch fault applied to the embedded source


class _GlobalAttention(nn.Module):
    """Luong's "general" attention, as OpenNMT-py's ``GlobalAttention``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear_in = nn.Linear(dim, dim, bias=False)
        self.linear_out = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, query: Tensor, memory: Tensor, pad_mask: Tensor) -> Tensor:
        scores = torch.bmm(memory, self.linear_in(query).unsqueeze(2)).squeeze(2)  # (B, S)
        weights = F.softmax(scores.masked_fill(pad_mask, -float("inf")), dim=1)
        context = torch.bmm(weights.unsqueeze(1), memory).squeeze(1)
        return torch.tanh(self.linear_out(torch.cat((context, query), dim=1)))


class Seq2SeqModel(nn.Module):
    """Encoder, input-feeding decoder and generator; ``forward`` gives log-probabilities."""

    def __init__(self, r: Seq2SeqRecipe) -> None:
        super().__init__()
        self.src_embeddings = nn.Embedding(_VOCAB, r.word_vec_size, padding_idx=PAD)
        self.tgt_embeddings = nn.Embedding(_VOCAB, r.word_vec_size, padding_idx=PAD)
        self.encoder = nn.LSTM(
            r.word_vec_size, r.rnn_size, r.layers, dropout=r.dropout, batch_first=True
        )
        self.cells = nn.ModuleList(
            nn.LSTMCell(r.word_vec_size + r.rnn_size if i == 0 else r.rnn_size, r.rnn_size)
            for i in range(r.layers)
        )
        self.dropout = nn.Dropout(r.dropout)
        self.attention = _GlobalAttention(r.rnn_size)
        self.generator = nn.Sequential(nn.Linear(r.rnn_size, _VOCAB), nn.LogSoftmax(dim=-1))
        for p in self.parameters():  # -param_init 0.1
            nn.init.uniform_(p, -r.param_init, r.param_init)

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> Tensor:
        """``(B, T, vocab)`` log-probabilities of the next target token, teacher-forced."""
        packed = nn.utils.rnn.pack_padded_sequence(
            self.dropout(self.src_embeddings(src)),
            src_lengths.cpu(),
            batch_first=True,
            enforce_sorted=False,
        )
        out, (h, c) = self.encoder(packed)
        memory = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)[0]
        pad_mask = src[:, : memory.shape[1]] == PAD
        states = [(h[i], c[i]) for i in range(len(self.cells))]
        feed = memory.new_zeros(src.shape[0], memory.shape[2])
        emb = self.dropout(self.tgt_embeddings(tgt_in))  # onmt's Embeddings(dropout=0.3)
        outputs = []
        for t in range(tgt_in.shape[1]):
            x = torch.cat((emb[:, t], feed), dim=1)
            for i, cell in enumerate(self.cells):  # onmt's StackedLSTM
                states[i] = cell(x, states[i])
                x = states[i][0] if i == len(self.cells) - 1 else self.dropout(states[i][0])
            feed = self.dropout(self.attention(x, memory, pad_mask))
            outputs.append(feed)
        return self.generator(torch.stack(outputs, dim=1))  # type: ignore[no-any-return]


def _chunks(ids: Tensor, starts: Tensor, lengths: Tensor) -> Seq2SeqBatch:
    src = torch.full((len(starts), int(lengths.max())), PAD, dtype=torch.long)
    tgt = torch.full((len(starts), int(lengths.max()) + 2), PAD, dtype=torch.long)
    for row, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist())):
        chunk = ids[start : start + length]
        src[row, :length] = chunk
        tgt[row, 0] = BOS
        tgt[row, 1 : length + 1] = chunk.flip(0)
        tgt[row, length + 1] = EOS
    return Seq2SeqBatch(src, lengths, tgt)


class Seq2SeqRun(RecipeRun):
    """OpenNMT-py's training loop on one seed (see the module docstring)."""

    def __init__(
        self,
        recipe: Seq2SeqRecipe,
        seed: int,
        *,
        wrap: Wrap | None,
        keep_clip: bool,
        steps: int,
        lr: float,
    ) -> None:
        self.recipe, self.seed = recipe, seed
        self.steps, self.lr = check_steps(steps), lr
        self.clip, self.keep_clip = recipe.max_grad_norm, keep_clip
        torch.manual_seed(seed)
        self.model: Seq2SeqModel = Seq2SeqModel(recipe)
        self.inner = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.optimizer, self.safe = apply_wrap(self.inner, wrap)
        self.criterion: Any = nn.NLLLoss(ignore_index=PAD, reduction="sum")
        if self.safe is not None:
            self.criterion = SafeLoss(self.criterion, optimizer=self.safe)
        self.training_step = 0
        self.model.train()

    def learning_rate(self, step: int) -> float:
        """``onmt.utils.optimizers.exponential_decay`` with the scaled start and period."""
        start = round(self.recipe.start_decay_share * self.steps)
        period = max(1, round(self.recipe.decay_share * self.steps))
        return self.lr * self.recipe.learning_rate_decay ** (
            max(step - start + period, 0) // period
        )

    def batch(self, step: int) -> Seq2SeqBatch:
        train, _ = corpus()
        g = torch.Generator().manual_seed(self.seed * _STRIDE + step)
        r = self.recipe
        lengths = torch.randint(r.min_chars, r.max_chars + 1, (r.batch_size,), generator=g)
        starts = torch.randint(0, len(train) - r.max_chars, (r.batch_size,), generator=g)
        return _chunks(train, starts, lengths)

    def corrupt(self, batch: Seq2SeqBatch, kind: str) -> Seq2SeqBatch:
        return batch._replace(fault=kind)  # applied to the embedded source

    def _forward(self, batch: Seq2SeqBatch) -> tuple[Tensor, Tensor]:
        with embedding_fault(self.model.src_embeddings, batch.fault):
            log_probs = self.model(batch.src, batch.src_lengths, batch.tgt[:, :-1])
        return log_probs.reshape(-1, log_probs.shape[-1]), batch.tgt[:, 1:].reshape(-1)

    def train_step(self, batch: Seq2SeqBatch) -> Tensor:
        """One iteration of onmt's ``Trainer``: forward, summed NLL / sentences,
        backward, then ``Optimizer.step`` (LR update, clip, step)."""
        self.optimizer.zero_grad()
        log_probs, gold = self._forward(batch)
        loss = self.criterion(log_probs, gold)
        loss.div(float(len(batch.src))).backward()  # -normalization sents
        self.training_step += 1
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.training_step)
        self.clip_line(self.model.parameters())
        self.optimizer.step()
        return loss.detach()  # type: ignore[no-any-return]

    def held_out_loss(self) -> float:
        _, held = corpus()
        r = self.recipe
        g = torch.Generator().manual_seed(7)  # the same chunks for every seed
        lengths = torch.randint(r.min_chars, r.max_chars + 1, (r.held_out_chunks,), generator=g)
        starts = torch.linspace(0, len(held) - r.max_chars - 1, r.held_out_chunks).long()
        batch = _chunks(held, starts, lengths)
        log_probs, gold = self._forward(batch)
        return float(F.nll_loss(log_probs, gold, ignore_index=PAD))


def build_seq2seq(
    seed: int = 0,
    *,
    wrap: Wrap | None = None,
    keep_clip: bool = True,
    steps: int | None = None,
    lr: float | None = None,
    recipe: Seq2SeqRecipe | None = None,
    **options: Any,
) -> Seq2SeqRun:
    """OpenNMT-py's default run on ``seed``: ``wrap`` the optimizer, keep or drop the
    ``max_grad_norm`` clip; ``lr`` (default 1.0), ``steps``; ``options`` override
    :class:`Seq2SeqRecipe` fields."""
    recipe = replace(recipe or Seq2SeqRecipe(), **options)
    return Seq2SeqRun(
        recipe,
        seed,
        wrap=wrap,
        keep_clip=keep_clip,
        steps=recipe.steps if steps is None else steps,
        lr=recipe.learning_rate if lr is None else lr,
    )

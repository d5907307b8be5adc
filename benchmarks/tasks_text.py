"""Real text for the benchmarks: a character-level language model on the standard library.

Every Python installation ships its standard library's ``.py`` files, so this is
real, messy text (code, comments, docstrings) that needs no download. The corpus is
the top-level ``.py`` files of ``os.path.dirname(os.__file__)`` whose names do not
start with ``_``, in sorted order, concatenated until :data:`CORPUS_CHARS`
characters; the first 90% is the training text, the last 10% the held-out text.
Characters map to ids by :func:`encode` (printable ASCII, newline and tab; anything
else to one "other" id). The text depends on the Python version (its stdlib), which
the reports record.

Two models read it: :class:`CharTransformer` (a small causal transformer) and
:class:`CharLSTM`. :class:`CharLMTask` gives the batch of a step from
``(seed, step)`` alone, so every method sees the same data in the same order.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "CORPUS_CHARS",
    "VOCAB",
    "CharLMTask",
    "CharLSTM",
    "CharTransformer",
    "corpus",
    "corpus_files",
    "encode",
]

CORPUS_CHARS = 400_000
HELD_OUT_SHARE = 0.1
#: ids 0..94: ASCII 32..126; 95: newline; 96: tab; 97: any other character
VOCAB = 98
_STRIDE = 1_000_003


def encode(text: str) -> Tensor:
    """The ids of ``text`` (see the module docstring), as an int64 tensor."""
    data = torch.tensor(list(text.encode("utf-32-le")), dtype=torch.uint8)
    codes = data.view(torch.int32).to(torch.int64)
    ids = torch.full_like(codes, 97)
    printable = (codes >= 32) & (codes <= 126)
    ids[printable] = codes[printable] - 32
    ids[codes == 10] = 95
    ids[codes == 9] = 96
    return ids


def corpus_files() -> list[str]:
    """The standard-library files the corpus is read from, in order."""
    folder = os.path.dirname(os.__file__)
    names = sorted(
        name for name in os.listdir(folder) if name.endswith(".py") and not name.startswith("_")
    )
    return [os.path.join(folder, name) for name in names]


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[Tensor, Tensor]:
    """``(train ids, held-out ids)``: read once per process."""
    parts: list[str] = []
    size = 0
    for path in corpus_files():
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
        parts.append(text)
        size += len(text)
        if size >= CORPUS_CHARS:
            break
    ids = encode("\n".join(parts)[:CORPUS_CHARS])
    cut = int(len(ids) * (1.0 - HELD_OUT_SHARE))
    return ids[:cut], ids[cut:]


class CharTransformer(nn.Module):
    """Embedding + learned positions + pre-norm causal ``TransformerEncoder``; ``(B, V, T)`` logits."""

    def __init__(self, vocab: int, d_model: int, seq_len: int, layers: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model,
            nhead=heads,
            dim_feedforward=4 * d_model,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq_len))

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:t]
        mask: Tensor = self.mask  # type: ignore[assignment]
        h = self.encoder(h, mask=mask[:t, :t], is_causal=True)
        return self.head(self.norm(h)).transpose(1, 2)


class CharLSTM(nn.Module):
    """Embedding + one LSTM layer + linear head; ``(B, V, T)`` logits."""

    def __init__(self, vocab: int, d_embed: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_embed)
        self.lstm = nn.LSTM(d_embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out).transpose(1, 2)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class CharLMTask:
    """Next-character prediction on :func:`corpus` with a transformer or an LSTM.

    The batch of a step is ``batch_size`` windows of ``seq_len + 1`` characters at
    offsets drawn from ``(seed, step)``; the held-out set is ``held_out_windows``
    evenly spaced windows of the held-out text (the same for every seed). The loss is
    cross-entropy (``reduction`` as given); the held-out metric is the mean
    cross-entropy in nats per character.
    """

    model: str = "transformer"  # or "lstm"
    seq_len: int = 32
    batch_size: int = 16
    d_model: int = 48
    layers: int = 2
    heads: int = 4
    held_out_windows: int = 256
    seed: int = 0

    name = "charlm"

    def _windows(self, ids: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
        index = starts[:, None] + torch.arange(self.seq_len + 1)[None, :]
        chunk = ids[index]
        return chunk[:, :-1], chunk[:, 1:]

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The ``(tokens, next tokens)`` batch of training step ``step``."""
        train, _ = corpus()
        generator = torch.Generator().manual_seed(self.seed * _STRIDE + step)
        starts = torch.randint(
            0, len(train) - self.seq_len - 1, (self.batch_size,), generator=generator
        )
        return self._windows(train, starts)

    def held_out(self) -> tuple[Tensor, Tensor]:
        """The held-out windows (independent of the seed)."""
        _, held = corpus()
        last = len(held) - self.seq_len - 1
        starts = torch.linspace(0, last, self.held_out_windows).long()
        return self._windows(held, starts)

    def make_model(self) -> nn.Module:
        """A fresh model, its initial weights fixed by the seed."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if self.model == "lstm":
                return CharLSTM(VOCAB, self.d_model, 2 * self.d_model)
            return CharTransformer(VOCAB, self.d_model, self.seq_len, self.layers, self.heads)

    def loss(self, pred: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        """The training loss: cross-entropy over every position."""
        return F.cross_entropy(pred, target, reduction=reduction)

    def metric(self, pred: Tensor, target: Tensor) -> float:
        """Held-out mean cross-entropy (nats per character)."""
        return float(F.cross_entropy(pred, target))

    @property
    def chance(self) -> float:
        """The loss of a uniform guess, ``ln(VOCAB)``."""
        return math.log(VOCAB)

"""Tacotron 2 as NVIDIA/tacotron2 ``model.py`` writes it, with configurable (small) sizes.

The model of the ``tacotron2`` recipe (:mod:`benchmarks.recipes_tacotron`): a character
embedding (uniform init of bound ``sqrt(3) * sqrt(2 / (n_symbols + dim))``); an encoder
of 1-D convolutions, each followed by BatchNorm, ReLU and dropout 0.5, and a
bidirectional LSTM over the packed sequence; a decoder with a prenet of two ReLU layers
whose dropout 0.5 stays on in ``eval()`` too, an attention LSTM cell, location-sensitive
attention (previous and cumulative weights through a 1-D convolution, padded encoder
steps masked), a decoder LSTM cell, a linear projection to ``n_frames_per_step`` mel
frames and a gate (stop) output; a postnet of 5 convolutions with BatchNorm, tanh on
all but the last, dropout 0.5; padded output frames set to 0 (mel) and 1e3 (gate
logits), as ``parse_output`` with ``mask_padding=True`` does. Xavier-uniform weights
with the gains of ``layers.py`` (``LinearNorm``/``ConvNorm``).

The decoder takes ``n_frames_per_step`` (the reduction factor r) as model.py does: the
teacher-forced input of each decoder step is the r previous frames, flattened; the
coarse decoder of the ``ddc`` situation is this decoder with r = 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["Decoder", "Tacotron2", "TacotronConfig", "mask_from_lengths"]

#: the ``w_init_gain`` values layers.py's ``LinearNorm``/``ConvNorm`` are given
_Gain = Literal["linear", "tanh", "relu", "sigmoid"]


@dataclass(frozen=True)
class TacotronConfig:
    """hparams.py's model parameters, at the benchmark's scale (hparams.py's in comments)."""

    n_symbols: int = 24
    symbols_embedding_dim: int = 32  # 512
    encoder_embedding_dim: int = 32  # 512
    encoder_kernel_size: int = 5
    encoder_n_convolutions: int = 3
    n_mel_channels: int = 20  # 80
    n_frames_per_step: int = 1
    attention_rnn_dim: int = 64  # 1024
    decoder_rnn_dim: int = 64  # 1024
    prenet_dim: int = 32  # 256
    p_attention_dropout: float = 0.1
    p_decoder_dropout: float = 0.1
    attention_dim: int = 32  # 128
    attention_location_n_filters: int = 8  # 32
    attention_location_kernel_size: int = 15  # 31
    postnet_embedding_dim: int = 32  # 512
    postnet_kernel_size: int = 5
    postnet_n_convolutions: int = 5
    mask_padding: bool = True


def mask_from_lengths(lengths: Tensor, max_len: int | None = None) -> Tensor:
    """``(B, max_len)`` bool, True at valid positions (utils.py's ``get_mask_from_lengths``)."""
    max_len = int(lengths.max()) if max_len is None else max_len
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def _linear(in_dim: int, out_dim: int, bias: bool = True, gain: _Gain = "linear") -> nn.Linear:
    layer = nn.Linear(in_dim, out_dim, bias=bias)
    nn.init.xavier_uniform_(layer.weight, gain=nn.init.calculate_gain(gain))
    return layer


def _conv(
    in_ch: int, out_ch: int, kernel: int, bias: bool = True, gain: _Gain = "linear"
) -> nn.Conv1d:
    conv = nn.Conv1d(in_ch, out_ch, kernel, padding=(kernel - 1) // 2, bias=bias)
    nn.init.xavier_uniform_(conv.weight, gain=nn.init.calculate_gain(gain))
    return conv


class _Attention(nn.Module):
    """Location-sensitive attention (model.py's ``Attention`` + ``LocationLayer``)."""

    def __init__(self, c: TacotronConfig) -> None:
        super().__init__()
        self.query_layer = _linear(c.attention_rnn_dim, c.attention_dim, bias=False, gain="tanh")
        self.memory_layer = _linear(
            c.encoder_embedding_dim, c.attention_dim, bias=False, gain="tanh"
        )
        self.v = _linear(c.attention_dim, 1, bias=False)
        self.location_conv = _conv(
            2, c.attention_location_n_filters, c.attention_location_kernel_size, bias=False
        )
        self.location_dense = _linear(
            c.attention_location_n_filters, c.attention_dim, bias=False, gain="tanh"
        )

    def forward(
        self,
        query: Tensor,
        memory: Tensor,
        processed_memory: Tensor,
        weights_cat: Tensor,
        mask: Tensor,
    ) -> tuple[Tensor, Tensor]:
        location = self.location_dense(self.location_conv(weights_cat).transpose(1, 2))
        energies = self.v(
            torch.tanh(self.query_layer(query.unsqueeze(1)) + location + processed_memory)
        ).squeeze(-1)
        energies = energies.masked_fill(mask, -math.inf)
        weights = F.softmax(energies, dim=1)
        context = torch.bmm(weights.unsqueeze(1), memory).squeeze(1)
        return context, weights


class _Prenet(nn.Module):
    def __init__(self, in_dim: int, sizes: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            _linear(i, o, bias=False) for i, o in zip([in_dim, *sizes[:-1]], sizes)
        )

    def forward(self, x: Tensor) -> Tensor:
        for linear in self.layers:
            x = F.dropout(F.relu(linear(x)), p=0.5, training=True)  # on at inference too
        return x


class _Encoder(nn.Module):
    def __init__(self, c: TacotronConfig) -> None:
        super().__init__()
        dim = c.encoder_embedding_dim
        self.convolutions = nn.ModuleList(
            nn.Sequential(_conv(dim, dim, c.encoder_kernel_size, gain="relu"), nn.BatchNorm1d(dim))
            for _ in range(c.encoder_n_convolutions)
        )
        self.lstm = nn.LSTM(dim, dim // 2, 1, batch_first=True, bidirectional=True)

    def forward(self, x: Tensor, input_lengths: Tensor) -> Tensor:
        for conv in self.convolutions:
            x = F.dropout(F.relu(conv(x)), 0.5, self.training)
        packed = nn.utils.rnn.pack_padded_sequence(
            x.transpose(1, 2), input_lengths.cpu(), batch_first=True
        )
        outputs, _ = self.lstm(packed)
        return nn.utils.rnn.pad_packed_sequence(outputs, batch_first=True)[0]


class Decoder(nn.Module):
    """model.py's ``Decoder`` (teacher-forced ``forward``), ``r = n_frames_per_step``."""

    def __init__(self, c: TacotronConfig, n_frames_per_step: int) -> None:
        super().__init__()
        self.c, self.r = c, n_frames_per_step
        frames = c.n_mel_channels * n_frames_per_step
        self.prenet = _Prenet(frames, [c.prenet_dim, c.prenet_dim])
        self.attention_rnn = nn.LSTMCell(
            c.prenet_dim + c.encoder_embedding_dim, c.attention_rnn_dim
        )
        self.attention_layer = _Attention(c)
        self.decoder_rnn = nn.LSTMCell(
            c.attention_rnn_dim + c.encoder_embedding_dim, c.decoder_rnn_dim
        )
        in_dim = c.decoder_rnn_dim + c.encoder_embedding_dim
        self.linear_projection = _linear(in_dim, frames)
        self.gate_layer = _linear(in_dim, 1, bias=True, gain="sigmoid")

    def forward(
        self, memory: Tensor, mels: Tensor, memory_lengths: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(mel (B, n_mel, T), gate logits (B, T / r), alignments (B, T / r, T_in))``
        for teacher-forced mels ``(B, n_mel, T)``, ``T`` a multiple of ``r``."""
        c, b = self.c, memory.shape[0]
        inputs = mels.transpose(1, 2).reshape(b, mels.shape[2] // self.r, -1).transpose(0, 1)
        go = memory.new_zeros(1, b, inputs.shape[2])
        inputs = self.prenet(torch.cat((go, inputs), dim=0))
        mask = ~mask_from_lengths(memory_lengths, memory.shape[1])
        processed_memory = self.attention_layer.memory_layer(memory)
        att_h = att_c = memory.new_zeros(b, c.attention_rnn_dim)
        dec_h = dec_c = memory.new_zeros(b, c.decoder_rnn_dim)
        weights = weights_cum = memory.new_zeros(b, memory.shape[1])
        context = memory.new_zeros(b, c.encoder_embedding_dim)
        mel_outputs, gate_outputs, alignments = [], [], []
        for t in range(inputs.shape[0] - 1):
            att_h, att_c = self.attention_rnn(torch.cat((inputs[t], context), -1), (att_h, att_c))
            att_h = F.dropout(att_h, c.p_attention_dropout, self.training)
            weights_cat = torch.stack((weights, weights_cum), dim=1)
            context, weights = self.attention_layer(
                att_h, memory, processed_memory, weights_cat, mask
            )
            weights_cum = weights_cum + weights
            dec_h, dec_c = self.decoder_rnn(torch.cat((att_h, context), -1), (dec_h, dec_c))
            dec_h = F.dropout(dec_h, c.p_decoder_dropout, self.training)
            hidden_context = torch.cat((dec_h, context), dim=1)
            mel_outputs.append(self.linear_projection(hidden_context))
            gate_outputs.append(self.gate_layer(hidden_context).squeeze(1))
            alignments.append(weights)
        mel = torch.stack(mel_outputs).transpose(0, 1).reshape(b, -1, c.n_mel_channels)
        gate = torch.stack(gate_outputs).transpose(0, 1)
        return mel.transpose(1, 2), gate, torch.stack(alignments).transpose(0, 1)


class _Postnet(nn.Module):
    def __init__(self, c: TacotronConfig) -> None:
        super().__init__()
        k, dim, n_mel = c.postnet_kernel_size, c.postnet_embedding_dim, c.n_mel_channels
        chans = [n_mel] + [dim] * (c.postnet_n_convolutions - 1) + [n_mel]
        self.convolutions = nn.ModuleList(
            nn.Sequential(
                _conv(i, o, k, gain="linear" if n == len(chans) - 2 else "tanh"),
                nn.BatchNorm1d(o),
            )
            for n, (i, o) in enumerate(zip(chans[:-1], chans[1:]))
        )

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convolutions[:-1]:
            x = F.dropout(torch.tanh(conv(x)), 0.5, self.training)
        return F.dropout(self.convolutions[-1](x), 0.5, self.training)  # type: ignore[no-any-return]


class Tacotron2(nn.Module):
    """model.py's ``Tacotron2``; ``coarse_r`` > 0 adds Coqui TTS's coarse decoder (DDC)."""

    def __init__(self, config: TacotronConfig, coarse_r: int = 0) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.n_symbols, config.symbols_embedding_dim)
        bound = math.sqrt(3.0) * math.sqrt(2.0 / (config.n_symbols + config.symbols_embedding_dim))
        nn.init.uniform_(self.embedding.weight, -bound, bound)
        self.encoder = _Encoder(config)
        self.decoder = Decoder(config, config.n_frames_per_step)
        self.postnet = _Postnet(config)
        self.coarse_decoder = Decoder(config, coarse_r) if coarse_r > 0 else None

    def forward(
        self, text: Tensor, text_lengths: Tensor, mels: Tensor, mel_lengths: Tensor
    ) -> dict[str, Tensor]:
        """``mel_out``, ``mel_postnet``, ``gate`` and ``alignments`` (and, with the coarse
        decoder, ``coarse_mel`` and ``coarse_alignments``: see :meth:`coarse_pass`)."""
        memory = self.encoder(self.embedding(text).transpose(1, 2), text_lengths)
        mel_out, gate, alignments = self.decoder(memory, mels, text_lengths)
        mel_postnet = mel_out + self.postnet(mel_out)
        out = {"mel_out": mel_out, "mel_postnet": mel_postnet, "gate": gate}
        if self.config.mask_padding:  # parse_output
            pad = ~mask_from_lengths(mel_lengths, mel_out.shape[2])
            out = {
                "mel_out": mel_out.masked_fill(pad[:, None, :], 0.0),
                "mel_postnet": mel_postnet.masked_fill(pad[:, None, :], 0.0),
                "gate": gate.masked_fill(pad, 1e3),
            }
        out["alignments"] = alignments
        if self.coarse_decoder is not None:
            out.update(self.coarse_pass(memory, mels, text_lengths, alignments))
        return out

    def coarse_pass(
        self, memory: Tensor, mels: Tensor, text_lengths: Tensor, alignments: Tensor
    ) -> dict[str, Tensor]:
        """Coqui TTS's ``_coarse_decoder_pass``: the coarse decoder reads the detached
        encoder output and the mels padded to a multiple of its r; its alignments
        (``T / r`` steps) are stretched to the fine decoder's ``T`` steps (nearest) and
        its frames cut back to ``T``: the two decoders differ in length by design."""
        assert self.coarse_decoder is not None
        r, frames = self.coarse_decoder.r, mels.shape[2]
        if frames % r:
            mels = F.pad(mels, (0, r - frames % r))
        coarse_mel, _, coarse_alignments = self.coarse_decoder(memory.detach(), mels, text_lengths)
        coarse_alignments = F.interpolate(
            coarse_alignments.transpose(1, 2), size=alignments.shape[1], mode="nearest"
        ).transpose(1, 2)
        return {"coarse_mel": coarse_mel[:, :, :frames], "coarse_alignments": coarse_alignments}

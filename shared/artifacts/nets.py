"""Classifier networks of the built-in zoo (see ``zoo`` for their arguments and signatures).

Every network is deterministic given ``torch.manual_seed`` (no dropout, default initialisers only
drawing from the global generator) and runs under ``torch.inference_mode``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "MLP", "LSTMClassifier", "SmallCNN", "TransformerClassifier", "check_token_ids"]

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Rejects token ids an embedding would fail on with an opaque "index out of range in self".

    Raises:
        ValueError: If ids are not integers or fall outside ``[0, vocab_size)``.
    """
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    # Meta tensors (shape-only checks) have no values to inspect.
    if input_ids.numel() and not input_ids.is_meta and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(
            f"input_ids must be in [0, {vocab_size}), got values in [{int(input_ids.min())}, {int(input_ids.max())}]"
        )


class MLP(nn.Module):
    """A fully connected network: ``Linear -> activation`` per hidden layer, then a ``Linear`` head."""

    def __init__(self, in_features: int, hidden: list[int], out_features: int, activation: str) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), ACTIVATIONS[activation]()]
            width = size
        layers.append(nn.Linear(width, out_features))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps ``[batch, in_features]`` to logits ``[batch, out_features]``."""
        return self.layers(x)


class SmallCNN(nn.Module):
    """A small convnet for square images: per stage ``Conv3x3 -> ReLU -> MaxPool2``, then a linear head.

    Sized by default for the 8x8 single-channel scikit-learn digits.
    """

    def __init__(self, in_channels: int, image_size: int, channels: list[int], num_classes: int) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        width, size = in_channels, image_size
        for out in channels:
            stages += [nn.Conv2d(width, out, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            width, size = out, size // 2
        self.features = nn.Sequential(*stages)
        self.head = nn.Linear(width * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps images ``[batch, in_channels, image_size, image_size]`` to logits ``[batch, num_classes]``."""
        return self.head(torch.flatten(self.features(x), 1))


class LSTMClassifier(nn.Module):
    """Embeds tokens, runs an LSTM and classifies from the last layer's final hidden state."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_size: int, num_layers: int, num_classes: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Maps token ids ``[batch, length]`` (length >= 1) to logits ``[batch, num_classes]``."""
        check_token_ids(input_ids, self.vocab_size)
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape [batch, length >= 1], got {list(input_ids.shape)}")
        _, (hidden, _) = self.lstm(self.embedding(input_ids))
        return self.head(hidden[-1])


class TransformerClassifier(nn.Module):
    """A pre-norm ``nn.TransformerEncoder`` over token plus learned position embeddings, mean-pooled."""

    def __init__(self, vocab_size: int, seq_len: int, width: int, depth: int, heads: int, num_classes: int) -> None:
        super().__init__()
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.embedding = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.empty(seq_len, width))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu", batch_first=True,
            norm_first=True,
        )  # fmt: skip
        # Nested tensors only help padded batches with masks, which we never pass; disabling them
        # also silences the warning norm_first=True would otherwise trigger.
        self.encoder = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(width), enable_nested_tensor=False)
        self.head = nn.Linear(width, num_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Maps token ids ``[batch, length <= seq_len]`` to logits ``[batch, num_classes]``."""
        check_token_ids(input_ids, self.vocab_size)
        if input_ids.dim() != 2 or not 1 <= input_ids.shape[1] <= self.seq_len:
            raise ValueError(
                f"input_ids must have shape [batch, length] with 1 <= length <= {self.seq_len}, "
                f"got {list(input_ids.shape)}"
            )
        x = self.embedding(input_ids) + self.position[: input_ids.shape[1]]
        return self.head(self.encoder(x).mean(dim=1))

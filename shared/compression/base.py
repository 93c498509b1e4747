"""Base classes shared by every codec: the codec (configuration plus decoding) and its encoders (state)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from shared.compression.wire import MAX_NDIM, MAX_NUMEL, Encoded, EncodingError, tensor_from_bytes

__all__ = ["Codec", "Encoder", "StatelessCodec", "check_finite", "check_grad", "check_keys", "read_buffer"]


class Encoder(ABC):
    """Encodes one worker's gradients, keyed by parameter name.

    An encoder may keep per-key state (top-k keeps an error-feedback residual), so a worker owns one
    encoder per codec and uses it from one thread; shards never need one.
    """

    #: Name of the codec this encoder produces (``Encoded.codec``).
    codec: str

    @abstractmethod
    def encode(self, key: str, grad: torch.Tensor) -> Encoded:
        """Encodes the gradient of parameter ``key``.

        Args:
            key: Parameter name; stateful encoders keep their state under it.
            grad: A floating-point, strided tensor on any device; it is never modified.

        Returns:
            The encoded tensor, with ``shape == tuple(grad.shape)``.

        Raises:
            ValueError: ``grad`` is not a floating-point tensor, is too large, or (stateful encoders) its
                shape or device changed since the previous step for the same key.
        """

    def residual(self, key: str) -> torch.Tensor | None:
        """Returns a copy of the state carried over for ``key`` (``None`` for stateless codecs or no state)."""
        del key
        return None

    def reset(self, key: str | None = None) -> None:
        """Drops the state carried for ``key``, or for every key when ``key`` is ``None``."""
        del key


class Codec(ABC):
    """A gradient compression scheme: validated options, an encoder factory and the matching decoder.

    Decoding needs nothing but the :class:`Encoded` itself (every parameter the decoder needs travels in
    ``meta``), so a shard decodes with the module-level ``decode`` and never builds a codec.
    """

    #: Registry name, also written to ``Encoded.codec``.
    name: ClassVar[str]

    @abstractmethod
    def encoder(self, *, generator: torch.Generator | None = None) -> Encoder:
        """Returns a new encoder with empty state.

        Args:
            generator: Random source for stochastic codecs (int8), on the gradients' device; ignored by
                deterministic codecs. ``None`` uses torch's default generator.
        """

    @classmethod
    @abstractmethod
    def decode_payload(
        cls, shape: tuple[int, ...], payload: dict[str, bytes], meta: dict[str, float | int], device: torch.device
    ) -> torch.Tensor:
        """Decodes a payload whose shape, buffer types and meta types the caller has already checked.

        Implementations must check everything codec-specific (keys, sizes, ranges, finiteness) on the
        host before copying anything to ``device``, and raise :class:`EncodingError` for any violation.

        Returns:
            A float32 tensor of ``shape`` on ``device``.
        """

    def __repr__(self) -> str:
        options = ", ".join(f"{name}={value!r}" for name, value in vars(self).items())
        return f"{type(self).__name__}({options})"


class StatelessCodec(Codec):
    """A codec whose encoding depends only on the gradient (and a random generator)."""

    def encoder(self, *, generator: torch.Generator | None = None) -> Encoder:
        return _StatelessEncoder(self, generator)

    @abstractmethod
    def encode_tensor(self, grad: torch.Tensor, generator: torch.Generator | None) -> Encoded:
        """Encodes a gradient already checked by :func:`check_grad`."""


class _StatelessEncoder(Encoder):
    def __init__(self, codec: StatelessCodec, generator: torch.Generator | None) -> None:
        self.codec = codec.name
        self._codec = codec
        self._generator = generator

    def encode(self, key: str, grad: torch.Tensor) -> Encoded:
        return self._codec.encode_tensor(check_grad(key, grad), self._generator)


def check_grad(key: str, grad: torch.Tensor) -> torch.Tensor:
    """Validates an encoder's arguments and returns the gradient detached from autograd.

    Raises:
        ValueError: ``key`` is not a string, or ``grad`` is not a dense floating-point tensor of at most
            :data:`MAX_NUMEL` elements and :data:`MAX_NDIM` dimensions.
    """
    if not isinstance(key, str):
        raise ValueError(f"parameter key must be a str, got {type(key).__name__}")
    if not isinstance(grad, torch.Tensor):
        raise ValueError(f"gradient for {key!r} must be a torch.Tensor, got {type(grad).__name__}")
    if grad.layout != torch.strided or not grad.is_floating_point():
        raise ValueError(f"gradient for {key!r} must be a dense floating-point tensor, got {grad.dtype}/{grad.layout}")
    if grad.ndim > MAX_NDIM or grad.numel() > MAX_NUMEL:
        raise ValueError(f"gradient for {key!r} of shape {tuple(grad.shape)} is too large to encode")
    return grad.detach()


def check_keys(
    codec: str, payload: dict[str, bytes], meta: dict[str, float | int], *, payload_keys: set[str], meta_keys: set[str]
) -> None:
    """Checks that ``payload`` and ``meta`` hold exactly the keys a codec defines.

    Unknown keys are rejected rather than ignored: a sender that adds them speaks another version of the
    format, and silently dropping data it believes it sent would corrupt training without a trace.

    Raises:
        EncodingError: A key is missing or unexpected.
    """
    if set(payload) != payload_keys:
        raise EncodingError(f"{codec!r} encoding needs payload keys {sorted(payload_keys)}, got {sorted(payload)}")
    if set(meta) != meta_keys:
        raise EncodingError(f"{codec!r} encoding needs meta keys {sorted(meta_keys)}, got {sorted(meta)}")


def read_buffer(codec: str, payload: dict[str, bytes], key: str, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Parses ``payload[key]`` as a CPU tensor, with an error message that names the codec and the buffer.

    Raises:
        EncodingError: The buffer's size disagrees with ``shape``.
    """
    try:
        return tensor_from_bytes(payload[key], dtype, shape)
    except EncodingError as exc:
        raise EncodingError(f"{codec!r} payload {key!r}: {exc}") from None


def check_finite(codec: str, key: str, values: torch.Tensor) -> None:
    """Rejects NaN and infinity in a decoded CPU buffer.

    One non-finite value applied by a shard would poison its parameters for good, so it is refused as bad
    input; the check runs on the host copy, before anything reaches the device, and costs no device sync.

    Raises:
        EncodingError: ``values`` holds a NaN or an infinity.
    """
    if not bool(torch.isfinite(values).all()):
        raise EncodingError(f"{codec!r} payload {key!r} holds non-finite values")

"""The codec registry, the codec factory and the one validating decoder every shard calls."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch

from shared.compression.base import Codec
from shared.compression.dense import Bf16Codec, Fp16Codec, NoneCodec
from shared.compression.int8 import Int8Codec
from shared.compression.topk import TopKCodec
from shared.compression.wire import Encoded, EncodingError, check_shape

__all__ = ["CODECS", "decode", "get_codec"]

#: Codec name -> codec class; read-only so that a name always means the same wire format.
CODECS: Mapping[str, type[Codec]] = MappingProxyType(
    {codec.name: codec for codec in (NoneCodec, Fp16Codec, Bf16Codec, Int8Codec, TopKCodec)}
)


def _unknown(name: object) -> EncodingError:
    return EncodingError(f"unknown codec {name!r}; known codecs: {', '.join(CODECS)}")


@functools.cache
def _signature(codec: type[Codec]) -> inspect.Signature:
    # A class without its own __init__ has object's, whose signature inspect parses from text: about 0.6 ms,
    # on every job submission (the scheduler validates the codec options of each).
    return inspect.signature(codec)


def get_codec(name: str, **options: Any) -> Codec:
    """Builds a codec from its registry name and options.

    Args:
        name: A key of :data:`CODECS`: ``"none"``, ``"fp16"``, ``"bf16"``, ``"int8"`` or ``"topk"``.
        **options: Codec options: ``bucket_size`` for int8, ``ratio`` for topk; the others take none.

    Returns:
        The codec; call ``.encoder()`` on it for each worker.

    Raises:
        ValueError: Unknown codec (the message lists the known ones), unknown option or invalid value.
    """
    codec = CODECS.get(name) if isinstance(name, str) else None
    if codec is None:
        raise _unknown(name)
    try:
        _signature(codec).bind(**options)
    except TypeError as exc:
        # Options usually come from configuration, so a wrong name is a ValueError like a wrong value.
        raise ValueError(f"invalid options for codec {name!r}: {exc}") from None
    return codec(**options)


def decode(
    encoded: Encoded, device: torch.device | str = "cpu", *, expected_shape: Sequence[int] | None = None
) -> torch.Tensor:
    """Validates an encoded tensor from an untrusted worker and decodes it to a dense float32 tensor.

    Every check (codec, keys, buffer sizes, index ranges, finiteness) runs on the host before anything is
    copied to ``device``, so a malformed message costs no device work and never leaves partial state.

    Args:
        encoded: The encoded tensor, typically rebuilt from protobuf fields.
        device: Device of the result.
        expected_shape: Shape the receiver expects (the parameter's shape). Shards should pass it: it
            rejects a gradient for the wrong parameter, and stops a forged ``shape`` with a tiny top-k
            payload from making the shard allocate a huge dense tensor.

    Returns:
        A float32 tensor of shape ``encoded.shape`` on ``device``.

    Raises:
        EncodingError: (a ``ValueError``) Any malformed field; the message says which and why.
    """
    if not isinstance(encoded, Encoded):
        raise EncodingError(f"expected an Encoded, got {type(encoded).__name__}")
    codec = CODECS.get(encoded.codec) if isinstance(encoded.codec, str) else None
    if codec is None:
        raise _unknown(encoded.codec)
    shape = check_shape(encoded.shape)
    if expected_shape is not None and shape != tuple(expected_shape):
        raise EncodingError(f"{encoded.codec!r} encoding has shape {shape}, expected {tuple(expected_shape)}")
    payload, meta = encoded.payload, encoded.meta
    if not isinstance(payload, dict) or not all(
        isinstance(key, str) and isinstance(value, bytes) for key, value in payload.items()
    ):
        raise EncodingError("payload must be a dict of str to bytes")
    if not isinstance(meta, dict) or not all(
        isinstance(key, str) and isinstance(value, int | float) and not isinstance(value, bool)
        for key, value in meta.items()
    ):
        raise EncodingError("meta must be a dict of str to int or float")
    return codec.decode_payload(shape, payload, meta, torch.device(device))

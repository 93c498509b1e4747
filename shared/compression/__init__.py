"""Gradient compression codecs for the sharded parameter server.

Workers encode gradients, shards decode them::

    codec = get_codec("topk", ratio=0.01)           # or "none", "fp16", "bf16", "int8"
    encoder = codec.encoder()                       # one per worker: top-k keeps residuals per key
    encoded = encoder.encode("layer1.weight", grad)  # -> Encoded(codec, shape, payload, meta)
    grad_hat = decode(encoded, device, expected_shape=param.shape)  # on the shard; float32

An :class:`Encoded` is plain data: little-endian raw tensor buffers (never pickle) that map onto protobuf
``bytes`` fields, and ``Encoded.nbytes`` is what it costs on the wire. :func:`decode` needs no codec
object and treats its input as hostile: every malformed field raises :class:`EncodingError`, a
``ValueError`` the parameter server maps to ``INVALID_ARGUMENT``.

Shapes: 0-d tensors (shape ``()``) and empty tensors are supported by every codec; an empty tensor
encodes to empty buffers.

This package is pure torch: no grpc, ray or generated protobuf code, so workers, shards and offline
tools can all import it.
"""

from shared.compression.base import Codec, Encoder, StatelessCodec
from shared.compression.dense import Bf16Codec, DenseCodec, Fp16Codec, NoneCodec
from shared.compression.int8 import DEFAULT_BUCKET_SIZE, LEVELS, Int8Codec
from shared.compression.registry import CODECS, decode, get_codec
from shared.compression.topk import DEFAULT_RATIO, TopKCodec, TopKEncoder, topk_count
from shared.compression.wire import (
    DTYPES,
    MAX_NDIM,
    MAX_NUMEL,
    Encoded,
    EncodingError,
    check_shape,
    dtype_name,
    tensor_from_bytes,
    tensor_to_bytes,
)

__all__ = [
    "CODECS",
    "DEFAULT_BUCKET_SIZE",
    "DEFAULT_RATIO",
    "DTYPES",
    "LEVELS",
    "MAX_NDIM",
    "MAX_NUMEL",
    "Bf16Codec",
    "Codec",
    "DenseCodec",
    "Encoded",
    "Encoder",
    "EncodingError",
    "Fp16Codec",
    "Int8Codec",
    "NoneCodec",
    "StatelessCodec",
    "TopKCodec",
    "TopKEncoder",
    "check_shape",
    "decode",
    "dtype_name",
    "get_codec",
    "tensor_from_bytes",
    "tensor_to_bytes",
    "topk_count",
]

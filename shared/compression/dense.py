"""Dense codecs: raw float32 ("none") and plain casts to 16-bit floats ("fp16", "bf16").

Wire format: ``payload = {"data": <numel little-endian elements>}``, ``meta = {}``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from shared.compression.base import StatelessCodec, check_finite, check_keys, read_buffer
from shared.compression.wire import Encoded, dtype_name, tensor_to_bytes

__all__ = ["Bf16Codec", "DenseCodec", "Fp16Codec", "NoneCodec"]


class DenseCodec(StatelessCodec):
    """Sends every element, cast to :attr:`dtype`; the decoder casts back to float32.

    No options. Deterministic, so the encoders ignore any generator.
    """

    #: Element type on the wire.
    dtype: ClassVar[torch.dtype]

    def encode_tensor(self, grad: torch.Tensor, generator: torch.Generator | None) -> Encoded:
        # Cast on the gradient's device so that only the (smaller) cast copy crosses to the host.
        data = grad.to(self.dtype)
        return Encoded(self.name, tuple(grad.shape), {"data": tensor_to_bytes(data)}, {})

    @classmethod
    def decode_payload(
        cls, shape: tuple[int, ...], payload: dict[str, bytes], meta: dict[str, float | int], device: torch.device
    ) -> torch.Tensor:
        check_keys(cls.name, payload, meta, payload_keys={"data"}, meta_keys=set())
        data = read_buffer(cls.name, payload, "data", dtype_name(cls.dtype), shape)
        check_finite(cls.name, "data", data)
        # Copy the 16-bit data to the device before widening it: half the bytes cross the bus.
        return data.to(device).float()


class NoneCodec(DenseCodec):
    """No compression: float32, bit-exact (4 bytes per element)."""

    name = "none"
    dtype = torch.float32


class Fp16Codec(DenseCodec):
    """IEEE half precision (2 bytes per element).

    About 3 significant digits; magnitudes above 65504 become infinite (and are then rejected by the
    decoder), so prefer "bf16" for gradients that are not already loss-scaled.
    """

    name = "fp16"
    dtype = torch.float16


class Bf16Codec(DenseCodec):
    """bfloat16 (2 bytes per element): float32's range with about 2-3 significant digits."""

    name = "bf16"
    dtype = torch.bfloat16

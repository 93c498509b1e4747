"""Top-k sparsification with error feedback ("topk").

Each step the encoder adds the residual it kept for the parameter to the new gradient, sends the ``k``
largest-magnitude entries of that sum exactly (float32) and keeps everything else as the next residual.
Nothing is ever dropped, only delayed: after any number of steps, the sum of everything decoded plus the
current residual equals the sum of the gradients, which is what lets top-k at 1 % converge like dense SGD.

Wire format: ``payload = {"indices": int[k], "values": float32[k]}`` with distinct flat (row-major)
indices in ``[0, numel)`` in any order, ``meta = {}``. Indices are int16 when every index fits (numel <=
32767), else int32: 6 or 8 bytes per sent entry. Both ends derive the width from the shape, so it costs
no metadata; at ratio 1 % the narrow indices are what takes a layer past a 50x reduction (8 bytes per
entry caps it at exactly 50x).
"""

from __future__ import annotations

import math

import torch

from shared.compression.base import Codec, Encoder, check_finite, check_grad, check_keys, read_buffer
from shared.compression.wire import Encoded, EncodingError, tensor_to_bytes

__all__ = ["DEFAULT_RATIO", "TopKCodec", "TopKEncoder", "topk_count"]

DEFAULT_RATIO = 0.01


def topk_count(numel: int, ratio: float) -> int:
    """Returns how many entries top-k sends for a tensor of ``numel`` elements.

    ``ceil(ratio * numel)``, at least 1 for a non-empty tensor (so every parameter makes progress), 0 for
    an empty one. The small slack absorbs float error: ``0.29 * 100`` is ``28.999999999999996``.
    """
    if numel == 0:
        return 0
    return min(numel, max(1, math.ceil(ratio * numel - 1e-6)))


class TopKCodec(Codec):
    """Top-k sparsification with per-parameter error feedback.

    Args:
        ratio: Fraction of entries sent each step, a float in ``(0, 1]``.

    Raises:
        ValueError: Invalid ``ratio``.
    """

    name = "topk"

    def __init__(self, ratio: float = DEFAULT_RATIO) -> None:
        valid = isinstance(ratio, int | float) and not isinstance(ratio, bool) and 0 < ratio <= 1
        if not valid:
            raise ValueError(f"topk ratio must be a number in (0, 1], got {ratio!r}")
        self.ratio = float(ratio)

    def encoder(self, *, generator: torch.Generator | None = None) -> TopKEncoder:
        del generator  # deterministic
        return TopKEncoder(self.ratio)

    @classmethod
    def decode_payload(
        cls, shape: tuple[int, ...], payload: dict[str, bytes], meta: dict[str, float | int], device: torch.device
    ) -> torch.Tensor:
        check_keys(cls.name, payload, meta, payload_keys={"indices", "values"}, meta_keys=set())
        numel = math.prod(shape)
        size = len(payload["indices"])
        index_dtype, width = index_type(numel)
        if size % width:
            raise EncodingError(f"'topk' payload 'indices' has {size} bytes, not a multiple of {width} ({index_dtype})")
        count = size // width
        if count > numel:
            raise EncodingError(f"'topk' encoding sends {count} entries for a tensor of {numel} elements")
        indices = read_buffer(cls.name, payload, "indices", index_dtype, (count,))
        values = read_buffer(cls.name, payload, "values", "float32", (count,))
        if count:
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= numel:
                raise EncodingError(f"'topk' index out of range [0, {numel}): min {low}, max {high}")
            # Duplicates would make the scatter below order-dependent (and nondeterministic on CUDA).
            if torch.unique(indices).numel() != count:
                raise EncodingError("'topk' payload 'indices' holds duplicate indices")
        check_finite(cls.name, "values", values)
        # Only the k sent entries cross to the device; the dense zeros are allocated there.
        dense = torch.zeros(numel, dtype=torch.float32, device=device)
        dense[indices.to(device=device, dtype=torch.int64)] = values.to(device)
        return dense.reshape(shape)


def index_type(numel: int) -> tuple[str, int]:
    """The index dtype (and its bytes) for a tensor of ``numel`` elements."""
    return ("int16", 2) if numel <= 32767 else ("int32", 4)


class TopKEncoder(Encoder):
    """A worker's top-k encoder: keeps one float32 residual per parameter key, on the gradient's device.

    Not thread-safe; the residuals cost one float32 copy of every parameter it has encoded.
    """

    codec = TopKCodec.name

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio
        self._residuals: dict[str, torch.Tensor] = {}

    def encode(self, key: str, grad: torch.Tensor) -> Encoded:
        grad = check_grad(key, grad)
        residual = self._residuals.get(key)
        if residual is not None and (residual.shape != grad.shape or residual.device != grad.device):
            raise ValueError(
                f"gradient for {key!r} is {tuple(grad.shape)} on {grad.device}, but the residual kept for it is "
                f"{tuple(residual.shape)} on {residual.device}; call reset({key!r}) if the parameter changed"
            )
        # A new contiguous tensor in both branches: the sent entries are zeroed in place through a flat
        # view below, and the caller's gradient (possibly strided, possibly float32 already) stays untouched.
        if residual is None:
            total = grad.float().clone(memory_format=torch.contiguous_format)
        else:
            total = (grad.float() + residual).contiguous()
        flat = total.view(-1)
        count = topk_count(flat.numel(), self.ratio)
        indices = torch.topk(flat.abs(), count, sorted=False).indices
        values = flat[indices]
        # What is sent is exact float32, so zeroing it leaves exactly what was not sent as the residual.
        flat[indices] = 0.0
        self._residuals[key] = total
        narrow = torch.int16 if index_type(flat.numel())[0] == "int16" else torch.int32
        payload = {"indices": tensor_to_bytes(indices.to(narrow)), "values": tensor_to_bytes(values)}
        return Encoded(self.codec, tuple(grad.shape), payload, {})

    def residual(self, key: str) -> torch.Tensor | None:
        residual = self._residuals.get(key)
        return None if residual is None else residual.clone()

    def reset(self, key: str | None = None) -> None:
        if key is None:
            self._residuals.clear()
        else:
            self._residuals.pop(key, None)

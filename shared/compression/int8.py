"""QSGD-style unbiased stochastic 8-bit quantisation ("int8").

The flattened gradient is split into buckets of ``bucket_size`` consecutive elements (default 4096; the
last one may be shorter). Each bucket has its own scale ``max|x|`` so that one large entry only coarsens
the quantisation of its own bucket, not of the whole tensor; the scales cost 4 bytes per bucket (0.1 % at
the default). Per-tensor scaling is ``bucket_size >= numel``.

Each element is sent as ``sign(x) * q`` with ``q = floor(|x| / scale * 127 + u)``, ``u ~ U[0, 1)``, so
``q`` is ``floor(v)`` or ``floor(v) + 1`` with probabilities that make ``E[q] = v`` and the decoded
``sign(x) * q * scale / 127`` an unbiased estimate of ``x`` whose error is below ``scale / 127``.

Wire format: ``payload = {"q": int8[numel], "scales": float32[ceil(numel / bucket_size)]}``,
``meta = {"bucket_size": int}`` (the bucket size used, capped at ``numel`` so a huge per-tensor bucket
never makes the encoder pad).
"""

from __future__ import annotations

import math

import torch

from shared.compression.base import StatelessCodec, check_finite, check_keys, read_buffer
from shared.compression.wire import MAX_NUMEL, Encoded, EncodingError, tensor_to_bytes

__all__ = ["DEFAULT_BUCKET_SIZE", "LEVELS", "Int8Codec"]

#: Quantisation levels per sign; 127 keeps ``sign * q`` inside int8 and symmetric (-128 is never sent).
LEVELS = 127

DEFAULT_BUCKET_SIZE = 4096


class Int8Codec(StatelessCodec):
    """Unbiased stochastic int8 quantisation with one float32 scale per bucket (about 1 byte per element).

    Args:
        bucket_size: Elements per scale, an int in ``[1, MAX_NUMEL]``.

    Raises:
        ValueError: Invalid ``bucket_size``.
    """

    name = "int8"

    def __init__(self, bucket_size: int = DEFAULT_BUCKET_SIZE) -> None:
        if not isinstance(bucket_size, int) or isinstance(bucket_size, bool) or not 1 <= bucket_size <= MAX_NUMEL:
            raise ValueError(f"int8 bucket_size must be an int in [1, {MAX_NUMEL}], got {bucket_size!r}")
        self.bucket_size = bucket_size

    def encode_tensor(self, grad: torch.Tensor, generator: torch.Generator | None) -> Encoded:
        flat = grad.reshape(-1).float()
        numel = flat.numel()
        bucket = min(self.bucket_size, max(numel, 1))
        buckets = -(-numel // bucket)
        padding = buckets * bucket - numel
        if padding:
            # Zero padding never raises a bucket's max and quantises to q = 0; it is cut before sending.
            flat = torch.nn.functional.pad(flat, (0, padding))
        x = flat.view(buckets, bucket)
        magnitude = x.abs()
        scales = magnitude.amax(dim=1, keepdim=True)
        # An all-zero bucket has scale 0; dividing by 1 instead quantises it to zeros without NaNs.
        divisor = torch.where(scales > 0, scales, torch.ones_like(scales))
        levels = magnitude / divisor * LEVELS
        noise = torch.rand(x.shape, generator=generator, dtype=torch.float32, device=x.device)
        # clamp: when v == 127, v + u can round up to 128 in float32 although the exact floor is 127.
        # nan_to_num: a NaN/inf gradient yields a non-finite scale, which the decoder rejects; mapping the
        # NaN levels to 0 keeps the float -> int8 cast defined meanwhile.
        q = torch.floor(levels + noise).clamp_(max=LEVELS).nan_to_num_(0.0)
        signed = (q * torch.sign(x)).to(torch.int8).reshape(-1)[:numel]
        return Encoded(
            self.name,
            tuple(grad.shape),
            {"q": tensor_to_bytes(signed), "scales": tensor_to_bytes(scales.reshape(-1))},
            {"bucket_size": bucket},
        )

    @classmethod
    def decode_payload(
        cls, shape: tuple[int, ...], payload: dict[str, bytes], meta: dict[str, float | int], device: torch.device
    ) -> torch.Tensor:
        check_keys(cls.name, payload, meta, payload_keys={"q", "scales"}, meta_keys={"bucket_size"})
        bucket = meta["bucket_size"]
        if isinstance(bucket, float) and bucket.is_integer():
            # A protobuf map of doubles delivers the int as a float; a whole number still means one thing.
            bucket = int(bucket)
        if not isinstance(bucket, int) or isinstance(bucket, bool) or not 1 <= bucket <= MAX_NUMEL:
            raise EncodingError(f"'int8' meta 'bucket_size' must be an int in [1, {MAX_NUMEL}], got {bucket!r}")
        numel = math.prod(shape)
        buckets = -(-numel // bucket)
        q = read_buffer(cls.name, payload, "q", "int8", (numel,))
        scales = read_buffer(cls.name, payload, "scales", "float32", (buckets,))
        check_finite(cls.name, "scales", scales)
        if bool((scales < 0).any()):
            raise EncodingError("'int8' payload 'scales' holds negative scales")
        if bool((q == -LEVELS - 1).any()):
            raise EncodingError(f"'int8' payload 'q' holds {-LEVELS - 1}, outside [-{LEVELS}, {LEVELS}]")
        # Decode on the device: the int8 codes are 4x smaller than the float32 result.
        q, scales = q.to(device), scales.to(device)
        # Full buckets as a matrix, the short last bucket apart: padding instead would let a forged huge
        # bucket_size make the shard allocate up to MAX_NUMEL floats for a tiny tensor.
        full = numel // bucket
        head = q[: full * bucket].float().view(full, bucket)
        # (q / 127) * scale: q * scale could overflow float32 for scales near its maximum, and scale / 127
        # could underflow for tiny ones; q / 127 is in [-1, 1] and the product never exceeds the scale.
        parts = [(head / LEVELS * scales[:full].unsqueeze(1)).reshape(-1)]
        if full < buckets:
            parts.append(q[full * bucket :].float() / LEVELS * scales[full])
        return torch.cat(parts).reshape(shape)

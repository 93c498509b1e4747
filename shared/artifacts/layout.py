"""How a model's state dict is laid out on disk for each variant (float32, fp16, bf16, int8).

One module owns the layout so that writing (``io``, ``variants``) and checking (``zoo.expected_state``)
cannot drift apart: both derive from :func:`storage_layout` and :func:`to_storage`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from shared.artifacts.datatypes import MODEL_DTYPES, torch_to_safetensors

__all__ = [
    "INT8_WEIGHT_ONLY",
    "QUANTIZATIONS",
    "SCALE_SUFFIX",
    "dequantize_int8",
    "from_storage",
    "is_quantized_weight",
    "quantize_int8",
    "storage_layout",
    "to_storage",
]

INT8_WEIGHT_ONLY = "int8-weight-only"
#: Quantization schemes a manifest may declare; None means plain floating weights.
QUANTIZATIONS: tuple[str | None, ...] = (None, INT8_WEIGHT_ONLY)
#: Suffix of the float32 per-output-channel scale stored next to each int8 weight.
SCALE_SUFFIX = ".__scale__"


def is_quantized_weight(dtype: torch.dtype, shape: tuple[int, ...]) -> bool:
    """Whether int8 weight-only quantization stores this tensor as int8.

    Only floating tensors of rank >= 2 (linear, conv, embedding and LSTM matrices) are quantized:
    biases and norm parameters are tiny and sensitive, so they stay float32. Empty tensors are skipped
    because they have no values to take a scale from.
    """
    return dtype.is_floating_point and len(shape) >= 2 and math.prod(shape) > 0


def storage_layout(
    state: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], dtype: str, quantization: str | None
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Maps a model's state (name -> torch dtype, shape) to what its artifact stores.

    Args:
        state: Dtype and shape of every state-dict entry of the float32 model.
        dtype: The manifest's model dtype (``"float32"``, ``"float16"`` or ``"bfloat16"``).
        quantization: The manifest's quantization, None or ``"int8-weight-only"``.

    Returns:
        Safetensors dtype and shape of every tensor the artifact must hold, including scale tensors.
    """
    model_dtype = MODEL_DTYPES[dtype]
    layout: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, (tensor_dtype, dims) in state.items():
        shape = tuple(dims)
        if not tensor_dtype.is_floating_point:
            layout[name] = (torch_to_safetensors(tensor_dtype), shape)
        elif quantization == INT8_WEIGHT_ONLY and is_quantized_weight(tensor_dtype, shape):
            layout[name] = ("I8", shape)
            layout[name + SCALE_SUFFIX] = ("F32", (shape[0],))
        elif quantization == INT8_WEIGHT_ONLY:
            layout[name] = ("F32", shape)
        else:
            layout[name] = (torch_to_safetensors(model_dtype), shape)
    return layout


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel (dim 0) int8 quantization.

    Returns:
        ``(q, scale)``: int8 values in [-127, 127] (-128 is left unused so the range is symmetric) and
        float32 scales of shape ``[weight.shape[0]]`` with ``weight ~= q * scale``.
    """
    w = weight.detach().to(torch.float32)
    amax = w.abs().amax(dim=tuple(range(1, w.dim())))
    # An all-zero channel would give scale 0 and a 0/0 division; any scale reproduces zeros exactly.
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    view = (-1,) + (1,) * (w.dim() - 1)
    q = torch.round(w / scale.view(view)).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_int8`, returning float32."""
    return q.to(torch.float32) * scale.to(torch.float32).view((-1,) + (1,) * (q.dim() - 1))


def to_storage(state: Mapping[str, torch.Tensor], dtype: str, quantization: str | None) -> dict[str, torch.Tensor]:
    """Converts a model's state dict (any floating dtype) to the tensors its artifact stores.

    Returns:
        Detached, contiguous CPU tensors laid out as :func:`storage_layout` describes.
    """
    model_dtype = MODEL_DTYPES[dtype]
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        tensor = value.detach()
        if not tensor.dtype.is_floating_point:
            out[name] = tensor
        elif quantization == INT8_WEIGHT_ONLY and is_quantized_weight(tensor.dtype, tuple(tensor.shape)):
            out[name], out[name + SCALE_SUFFIX] = quantize_int8(tensor)
        elif quantization == INT8_WEIGHT_ONLY:
            out[name] = tensor.to(torch.float32)
        else:
            out[name] = tensor.to(model_dtype)
    # safetensors needs contiguous CPU tensors that own distinct storage.
    return {name: t.to("cpu").contiguous() for name, t in out.items()}


def from_storage(tensors: Mapping[str, torch.Tensor], dtype: str, quantization: str | None) -> dict[str, torch.Tensor]:
    """Turns an artifact's tensors back into a state dict for a model of the manifest dtype.

    int8 weights are dequantized to float32 (int8 manifests always compute in float32). Callers must
    have checked the tensors against :func:`storage_layout` first.
    """
    if quantization != INT8_WEIGHT_ONLY:
        return dict(tensors)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = tensors.get(name + SCALE_SUFFIX)
        state[name] = tensor if scale is None else dequantize_int8(tensor, scale)
    return state

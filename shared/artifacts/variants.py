"""Deriving smaller variants (fp16, bf16, int8 weight-only) of a float32 artifact."""

from __future__ import annotations

import dataclasses
import os

import safetensors
from safetensors import safe_open

from shared.artifacts.datatypes import torch_to_safetensors
from shared.artifacts.errors import ArtifactError
from shared.artifacts.io import check_weights, manifest_from_header, write_tensors
from shared.artifacts.layout import INT8_WEIGHT_ONLY, to_storage
from shared.artifacts.manifest import Manifest
from shared.artifacts.safetensors_header import read_header, tensor_table

__all__ = ["VARIANTS", "derive_variant", "variant_manifest"]

#: Variant names and the (dtype, quantization) their manifests declare.
_TARGETS: dict[str, tuple[str, str | None]] = {
    "fp16": ("float16", None),
    "bf16": ("bfloat16", None),
    "int8": ("float32", INT8_WEIGHT_ONLY),
}
VARIANTS: tuple[str, ...] = tuple(_TARGETS)


def variant_manifest(manifest: Manifest, variant: str) -> Manifest:
    """Returns the manifest of ``variant`` of a float32 artifact: same architecture, arguments, signature.

    Raises:
        ArtifactError: If the variant is unknown or ``manifest`` is not a plain float32 manifest.
    """
    if variant not in _TARGETS:
        raise ArtifactError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
    if manifest.dtype != "float32" or manifest.quantization is not None:
        # Deriving from an already reduced artifact would compound rounding (e.g. bf16 -> fp16).
        raise ArtifactError(
            f"variants are derived from float32 artifacts; this one is {manifest.quantization or manifest.dtype}"
        )
    dtype, quantization = _TARGETS[variant]
    return dataclasses.replace(manifest, dtype=dtype, quantization=quantization)


def derive_variant(
    source_path: str | os.PathLike, manifest: Manifest | None, variant: str, dest_path: str | os.PathLike
) -> Manifest:
    """Writes an fp16, bf16 or int8 (weight-only) variant of a float32 artifact.

    fp16/bf16 cast every floating tensor. int8 quantizes floating tensors of rank >= 2 per output
    channel (symmetric, scale = max|w| / 127) into an int8 tensor of the same name plus a float32
    ``"<name>.__scale__"``; all other tensors stay float32. Tensors are read one at a time, so peak
    memory is the output plus one source tensor.

    Args:
        source_path: The float32 artifact.
        manifest: Its manifest, or None to use the one embedded in it.
        variant: One of :data:`VARIANTS`.
        dest_path: Where to write the variant (atomically; may equal ``source_path``).

    Returns:
        The variant's manifest, which is also embedded in the written file.

    Raises:
        ArtifactError: If the variant is unknown, the source is not a valid float32 artifact, or its
            tensors do not match the manifest.
    """
    if variant not in _TARGETS:
        raise ArtifactError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
    header, _ = read_header(source_path)
    if manifest is None:
        manifest = manifest_from_header(header)
    target = variant_manifest(manifest, variant)
    table = tensor_table(header)
    check_weights(manifest, table)
    tensors = {}
    try:
        with safe_open(os.fspath(source_path), framework="pt") as source:
            for name in table:
                tensors.update(to_storage({name: source.get_tensor(name)}, target.dtype, target.quantization))
    except safetensors.SafetensorError as exc:
        raise ArtifactError(f"safetensors: {exc}") from None
    check_weights(target, {n: (torch_to_safetensors(t.dtype), tuple(t.shape)) for n, t in tensors.items()})
    write_tensors(tensors, target, dest_path)
    return target

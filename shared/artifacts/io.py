"""Reading and writing model artifacts: one safetensors file with the manifest in its metadata.

Loading never executes code or unpickles: the header is validated (``safetensors_header``), the tensor
table is checked against what the zoo architecture expects, and only then are the tensors read with
safetensors and loaded into a model the zoo built.
"""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from collections.abc import Callable, Mapping

import safetensors
import safetensors.torch
import torch
from torch import nn

from shared.artifacts.datatypes import torch_to_safetensors
from shared.artifacts.errors import ArtifactError
from shared.artifacts.layout import from_storage, to_storage
from shared.artifacts.manifest import Manifest
from shared.artifacts.safetensors_header import METADATA_KEY, read_header, tensor_table
from shared.artifacts.zoo import build_model, expected_state

__all__ = [
    "MANIFEST_METADATA_KEY",
    "Source",
    "artifact_bytes",
    "check_weights",
    "load_artifact",
    "manifest_from_header",
    "read_manifest",
    "save_artifact",
    "write_tensors",
]

#: safetensors metadata key holding the manifest JSON.
MANIFEST_METADATA_KEY = "maas.manifest"
#: Where an artifact can be read from: a path, or the artifact's bytes.
Source = str | os.PathLike | bytes | bytearray | memoryview

_MAX_LISTED = 5  # names listed per error message; the rest are counted


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    return shown if len(names) <= _MAX_LISTED else f"{shown} and {len(names) - _MAX_LISTED} more"


def _variant(manifest: Manifest) -> str:
    return manifest.quantization or manifest.dtype


def check_weights(manifest: Manifest, table: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
    """Checks an artifact's tensor table against what the manifest's model and variant require.

    Args:
        manifest: The manifest the weights claim to belong to.
        table: name -> (safetensors dtype, shape), e.g. from :func:`tensor_table`.

    Raises:
        ArtifactError: On missing or unexpected tensors, or a tensor of the wrong shape or dtype.
    """
    expected = expected_state(manifest)
    where = f"architecture '{manifest.architecture}' ({_variant(manifest)})"
    missing = sorted(expected.keys() - table.keys())
    if missing:
        raise ArtifactError(f"weights: missing {len(missing)} tensor(s) required by {where}: {_names(missing)}")
    unexpected = sorted(table.keys() - expected.keys())
    if unexpected:
        raise ArtifactError(f"weights: {len(unexpected)} unexpected tensor(s) not in {where}: {_names(unexpected)}")
    for name in sorted(expected):
        (want_dtype, want_shape), (dtype, shape) = expected[name], table[name]
        if tuple(shape) != want_shape:
            raise ArtifactError(
                f"weights: tensor '{name}' has shape {list(shape)}, but {where} with these arguments "
                f"needs {list(want_shape)}"
            )
        if dtype != want_dtype:
            raise ArtifactError(f"weights: tensor '{name}' is {dtype}, but {where} stores it as {want_dtype}")


def manifest_from_header(header: dict) -> Manifest:
    """Returns the manifest embedded in a validated header's metadata.

    Raises:
        ArtifactError: If there is none, or it is invalid.
    """
    metadata = header.get(METADATA_KEY) or {}
    text = metadata.get(MANIFEST_METADATA_KEY)
    if text is None:
        raise ArtifactError(
            f"artifact has no embedded manifest (safetensors metadata key '{MANIFEST_METADATA_KEY}'); "
            "supply the manifest explicitly"
        )
    return Manifest.from_json(text)


def _open(source: Source) -> tuple[dict, Callable[[], dict[str, torch.Tensor]]]:
    """Validates the header and returns it with a function that reads the tensors."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        header, _ = read_header(io.BytesIO(data), len(data))
        return header, lambda: safetensors.torch.load(data)
    path = os.fspath(source)
    header, _ = read_header(path)
    return header, lambda: safetensors.torch.load_file(path)


def read_manifest(source: Source) -> Manifest:
    """Returns the manifest embedded in an artifact, after validating the header (tensors are not read).

    Raises:
        ArtifactError: If the header is invalid or there is no valid embedded manifest.
    """
    header, _ = _open(source)
    return manifest_from_header(header)


def load_artifact(source: Source, manifest: Manifest | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Loads an artifact into a zoo model, in eval mode.

    fp16/bf16 artifacts give a model of that dtype; int8 artifacts are dequantized to float32.

    Args:
        source: Path to the artifact, or its bytes.
        manifest: The manifest to load under; by default the one embedded in the artifact.
        device: Device for the model's tensors.

    Raises:
        ArtifactError: If the header is invalid or lying, the manifest is missing or invalid, or the
            tensors do not match what the manifest's architecture and variant expect.
    """
    header, read_tensors = _open(source)
    if manifest is None:
        manifest = manifest_from_header(header)
    table = tensor_table(header)
    check_weights(manifest, table)
    try:
        tensors = read_tensors()
    except safetensors.SafetensorError as exc:
        raise ArtifactError(f"safetensors: {exc}") from None
    # A file replaced between the header check and the read would otherwise slip past check_weights.
    if {n: (torch_to_safetensors(t.dtype), tuple(t.shape)) for n, t in tensors.items()} != table:
        raise ArtifactError("artifact changed while it was being loaded")
    state = {name: t.to(device) for name, t in from_storage(tensors, manifest.dtype, manifest.quantization).items()}
    # Building on meta and assigning the loaded tensors skips a throwaway random initialisation, but
    # only works when every buffer is persistent; otherwise the buffers need real values from __init__.
    module = build_model(manifest, device="meta")
    assign = {name for name, _ in module.named_buffers()} <= set(module.state_dict())
    if not assign:
        module = build_model(manifest, device=device)
    try:
        module.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as exc:  # unreachable after check_weights unless an architecture misbehaves
        raise ArtifactError(f"weights: {exc}") from None
    for submodule in module.modules():
        # Assigned weights are separate tensors; cuDNN wants RNN weights in one chunk (no-op on CPU).
        if isinstance(submodule, nn.RNNBase):
            submodule.flatten_parameters()
    return module.eval()


def _storage_tensors(module: nn.Module, manifest: Manifest) -> dict[str, torch.Tensor]:
    state = module.state_dict()
    if any(t.is_meta for t in state.values()):
        raise ArtifactError("cannot save a module on the meta device: it has no weight values")
    tensors = to_storage(state, manifest.dtype, manifest.quantization)
    check_weights(manifest, {n: (torch_to_safetensors(t.dtype), tuple(t.shape)) for n, t in tensors.items()})
    return tensors


def _metadata(manifest: Manifest) -> dict[str, str]:
    return {MANIFEST_METADATA_KEY: manifest.to_json()}


def write_tensors(tensors: dict[str, torch.Tensor], manifest: Manifest, path: str | os.PathLike) -> None:
    """Writes storage-layout tensors and the manifest to ``path`` atomically.

    The file is written next to its destination and renamed into place, so readers never see a
    half-written artifact and a failed write leaves any previous file intact.
    """
    path = os.fspath(path)
    # A unique sibling name rather than tempfile.mkstemp, whose 0600 mode would survive the rename and
    # hide the artifact from services running as other users.
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=_metadata(manifest))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_artifact(module: nn.Module, manifest: Manifest, path: str | os.PathLike) -> None:
    """Saves a module's weights and the manifest as one safetensors artifact.

    Floating weights are cast (or int8-quantized) to the variant the manifest declares, so a float32
    module can be saved directly under an fp16, bf16 or int8 manifest.

    Raises:
        ArtifactError: If the module's state does not match the manifest's architecture and arguments.
    """
    write_tensors(_storage_tensors(module, manifest), manifest, path)


def artifact_bytes(module: nn.Module, manifest: Manifest) -> bytes:
    """Returns the artifact :func:`save_artifact` would write, as bytes.

    Raises:
        ArtifactError: If the module's state does not match the manifest's architecture and arguments.
    """
    return safetensors.torch.save(_storage_tensors(module, manifest), metadata=_metadata(manifest))

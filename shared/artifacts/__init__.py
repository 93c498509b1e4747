"""Model artifacts: safetensors weights plus a JSON manifest naming a built-in zoo architecture.

Artifacts never contain code: loading validates the safetensors header, checks the tensors against the
architecture the manifest names, and loads them with safetensors (never pickle) into a model built
from the trusted zoo. Every validation failure raises :class:`ArtifactError` (a ``ValueError``) with a
message fit to show API clients.

This package must stay free of grpc, ray and generated protobuf code so that every service (and
offline tools) can import it.
"""

from shared.artifacts.datatypes import (
    DATATYPES,
    MODEL_DTYPES,
    SAFETENSORS_DTYPE_SIZES,
    SAFETENSORS_DTYPES,
    datatype_size,
    datatype_to_numpy,
    datatype_to_safetensors,
    datatype_to_torch,
    numpy_to_datatype,
    safetensors_to_torch,
    torch_to_datatype,
    torch_to_safetensors,
)
from shared.artifacts.decoder import greedy_generate
from shared.artifacts.errors import ArtifactError
from shared.artifacts.io import (
    MANIFEST_METADATA_KEY,
    artifact_bytes,
    check_weights,
    load_artifact,
    manifest_from_header,
    read_manifest,
    save_artifact,
)
from shared.artifacts.layout import INT8_WEIGHT_ONLY, SCALE_SUFFIX
from shared.artifacts.manifest import Manifest, Signature, TensorSpec
from shared.artifacts.safetensors_header import read_header, tensor_table, validate_header
from shared.artifacts.variants import VARIANTS, derive_variant, variant_manifest
from shared.artifacts.zoo import (
    DEFAULT_MAX_ELEMENTS,
    Architecture,
    architectures,
    build_model,
    configure_zoo_limits,
    expected_state,
    get_architecture,
    register_architecture,
    zoo_max_elements,
)

__all__ = [
    "DATATYPES",
    "DEFAULT_MAX_ELEMENTS",
    "INT8_WEIGHT_ONLY",
    "MANIFEST_METADATA_KEY",
    "MODEL_DTYPES",
    "SAFETENSORS_DTYPES",
    "SAFETENSORS_DTYPE_SIZES",
    "SCALE_SUFFIX",
    "VARIANTS",
    "Architecture",
    "ArtifactError",
    "Manifest",
    "Signature",
    "TensorSpec",
    "architectures",
    "artifact_bytes",
    "build_model",
    "check_weights",
    "configure_zoo_limits",
    "datatype_size",
    "datatype_to_numpy",
    "datatype_to_safetensors",
    "datatype_to_torch",
    "derive_variant",
    "expected_state",
    "get_architecture",
    "greedy_generate",
    "load_artifact",
    "manifest_from_header",
    "numpy_to_datatype",
    "read_header",
    "read_manifest",
    "register_architecture",
    "safetensors_to_torch",
    "save_artifact",
    "tensor_table",
    "torch_to_datatype",
    "torch_to_safetensors",
    "validate_header",
    "variant_manifest",
    "zoo_max_elements",
]

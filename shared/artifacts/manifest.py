"""The artifact manifest: which architecture, with which arguments, serving which signature.

A manifest is the only description of a model an artifact carries (weights aside), and it arrives
from API clients, so parsing is strict: every key, type and value is checked, and the signature must
be exactly the one the zoo computes for the architecture and arguments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from shared.artifacts.datatypes import MODEL_DTYPES
from shared.artifacts.errors import ArtifactError
from shared.artifacts.layout import INT8_WEIGHT_ONLY, QUANTIZATIONS
from shared.artifacts.signature import Signature, TensorSpec
from shared.artifacts.zoo import get_architecture

__all__ = ["FORMAT_VERSION", "FRAMEWORKS", "MAX_MANIFEST_BYTES", "Manifest", "Signature", "TensorSpec"]

FORMAT_VERSION = 1
FRAMEWORKS: tuple[str, ...] = ("pytorch",)
#: Manifests are a few hundred bytes; the bound keeps a hostile request from making us parse megabytes.
MAX_MANIFEST_BYTES = 1 << 20

_REQUIRED_KEYS = frozenset({"architecture", "arguments", "signature", "format_version"})
_OPTIONAL_KEYS = frozenset({"dtype", "framework", "quantization"})


def _quote_all(names: set[str] | frozenset[str]) -> str:
    return ", ".join(repr(n) for n in sorted(names))


def _describe(signature: Signature) -> str:
    def side(specs: tuple[TensorSpec, ...]) -> str:
        return ", ".join(f"{s.name} {s.datatype} {list(s.shape)}" for s in specs)

    return f"inputs ({side(signature.inputs)}) -> outputs ({side(signature.outputs)})"


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of repeated keys; a manifest that says two things must not mean one.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ArtifactError(f"manifest: key {key!r} appears more than once")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ArtifactError(f"manifest: {name} is not valid JSON")


@dataclass(frozen=True)
class Manifest:
    """Everything needed to rebuild a model before loading its weights.

    Constructing one validates it; ``arguments`` is replaced by the complete, validated arguments
    (defaults filled in) so that every artifact is self-describing even if zoo defaults change.

    Attributes:
        architecture: Zoo architecture id, e.g. ``"mlp"``.
        arguments: Architecture arguments (hashing ignores them; equality does not).
        signature: The model's inputs and outputs on the wire; must equal the zoo's signature for
            these arguments. It stays FP32 for fp16/bf16/int8 variants: servers cast at the boundary.
        dtype: Model compute dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        framework: Always ``"pytorch"`` for now.
        format_version: Manifest format version, currently 1.
        quantization: None, or ``"int8-weight-only"`` (which requires dtype ``"float32"``).

    Raises:
        ArtifactError: If any field is invalid.
    """

    architecture: str
    arguments: dict[str, Any] = field(hash=False)
    signature: Signature
    dtype: str = "float32"
    framework: str = "pytorch"
    format_version: int = FORMAT_VERSION
    quantization: str | None = None

    def __post_init__(self) -> None:
        try:
            architecture = get_architecture(self.architecture)
            arguments = architecture.resolve(self.arguments)
        except ArtifactError as exc:
            raise ArtifactError(f"manifest: {exc}") from None
        object.__setattr__(self, "arguments", arguments)
        if not isinstance(self.framework, str) or self.framework not in FRAMEWORKS:
            raise ArtifactError(
                f"manifest: unsupported framework {self.framework!r} (supported: {', '.join(FRAMEWORKS)})"
            )
        if (
            not isinstance(self.format_version, int)
            or isinstance(self.format_version, bool)
            or self.format_version != FORMAT_VERSION
        ):
            raise ArtifactError(
                f"manifest: unsupported format_version {self.format_version!r} (supported: {FORMAT_VERSION})"
            )
        if not isinstance(self.dtype, str) or self.dtype not in MODEL_DTYPES:
            raise ArtifactError(f"manifest: unsupported dtype {self.dtype!r} (supported: {', '.join(MODEL_DTYPES)})")
        if self.quantization not in QUANTIZATIONS:
            raise ArtifactError(
                f"manifest: unsupported quantization {self.quantization!r} "
                f"(supported: null, {', '.join(q for q in QUANTIZATIONS if q)})"
            )
        if self.quantization == INT8_WEIGHT_ONLY and self.dtype != "float32":
            raise ArtifactError(
                f"manifest: quantization {INT8_WEIGHT_ONLY!r} requires dtype 'float32' "
                f"(weights dequantize to float32), got {self.dtype!r}"
            )
        if not isinstance(self.signature, Signature):
            raise ArtifactError(f"manifest: signature must be a Signature, got {type(self.signature).__name__}")
        expected = architecture.signature(arguments)
        if self.signature != expected:
            raise ArtifactError(
                f"manifest: signature {_describe(self.signature)} does not match architecture "
                f"'{self.architecture}' with these arguments, which has {_describe(expected)}"
            )

    @classmethod
    def for_model(
        cls,
        architecture: str,
        arguments: dict[str, Any] | None = None,
        *,
        dtype: str = "float32",
        quantization: str | None = None,
    ) -> Manifest:
        """Builds a manifest whose signature (and missing arguments) come from the zoo.

        Args:
            architecture: Zoo architecture id.
            arguments: Any subset of the architecture's arguments; the rest take their defaults.
            dtype: Model compute dtype.
            quantization: None or ``"int8-weight-only"``.

        Raises:
            ArtifactError: If the architecture, arguments, dtype or quantization are invalid.
        """
        try:
            spec = get_architecture(architecture)
            resolved = spec.resolve(arguments)
        except ArtifactError as exc:
            raise ArtifactError(f"manifest: {exc}") from None
        return cls(
            architecture=architecture,
            arguments=resolved,
            signature=spec.signature(resolved),
            dtype=dtype,
            quantization=quantization,
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns the JSON-ready form (every key present, ``quantization`` possibly null)."""
        return {
            "architecture": self.architecture,
            "arguments": self.arguments,
            "signature": self.signature.to_dict(),
            "dtype": self.dtype,
            "framework": self.framework,
            "format_version": self.format_version,
            "quantization": self.quantization,
        }

    def to_json(self) -> str:
        """Returns canonical JSON (sorted keys, no whitespace, ASCII only): equal manifests, equal text."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parses and validates a manifest.

        ``architecture``, ``arguments``, ``signature`` and ``format_version`` are required; ``dtype``,
        ``framework`` and ``quantization`` default as in the dataclass. Arguments may be a subset.

        Raises:
            ArtifactError: If the text is not a JSON object of the manifest shape, or any value is
                invalid. Messages start with ``"manifest: "``.
        """
        if isinstance(text, (bytes, bytearray, memoryview)):
            if len(text) > MAX_MANIFEST_BYTES:
                raise ArtifactError(f"manifest: {len(text)} bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit")
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ArtifactError(f"manifest: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        if not isinstance(text, str):
            raise ArtifactError(f"manifest: expected JSON text, got {type(text).__name__}")
        if len(text) > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"manifest: {len(text)} characters exceeds the {MAX_MANIFEST_BYTES} limit")
        try:
            data = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
        except json.JSONDecodeError as exc:
            raise ArtifactError(
                f"manifest: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
            ) from None
        except RecursionError:
            raise ArtifactError("manifest: JSON is nested too deeply") from None
        except ArtifactError:
            raise
        except ValueError:
            # Integers beyond Python's digit limit for int conversion.
            raise ArtifactError("manifest: a number in the JSON is too long") from None
        if not isinstance(data, dict):
            raise ArtifactError(f"manifest: must be a JSON object, got {type(data).__name__}")
        return cls._from_dict(data)

    @classmethod
    def _from_dict(cls, data: dict[str, Any]) -> Manifest:
        missing, unknown = _REQUIRED_KEYS - data.keys(), data.keys() - _REQUIRED_KEYS - _OPTIONAL_KEYS
        if missing:
            raise ArtifactError(f"manifest: missing required key(s) {_quote_all(missing)}")
        if unknown:
            raise ArtifactError(
                f"manifest: unknown key(s) {_quote_all(unknown)} "
                f"(allowed: {', '.join(sorted(_REQUIRED_KEYS | _OPTIONAL_KEYS))})"
            )
        for key, kind, name in (
            ("architecture", str, "a string"),
            ("arguments", dict, "an object"),
            ("dtype", str, "a string"),
            ("framework", str, "a string"),
        ):
            if key in data and not isinstance(data[key], kind):
                raise ArtifactError(f"manifest: '{key}' must be {name}, got {json.dumps(data[key])}")
        version = data["format_version"]
        if not isinstance(version, int) or isinstance(version, bool):
            raise ArtifactError(f"manifest: 'format_version' must be an integer, got {json.dumps(version)}")
        quantization = data.get("quantization")
        if quantization is not None and not isinstance(quantization, str):
            raise ArtifactError(f"manifest: 'quantization' must be a string or null, got {json.dumps(quantization)}")
        # The architecture first: "unknown architecture" says more than any signature complaint would.
        try:
            get_architecture(data["architecture"])
        except ArtifactError as exc:
            raise ArtifactError(f"manifest: {exc}") from None
        try:
            signature = Signature.from_dict(data["signature"])
        except ArtifactError as exc:
            raise ArtifactError(f"manifest: {exc}") from None
        optional = {key: data[key] for key in _OPTIONAL_KEYS if key in data}
        return cls(
            architecture=data["architecture"],
            arguments=data["arguments"],
            signature=signature,
            format_version=version,
            **optional,
        )

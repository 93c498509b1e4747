"""Model input/output signatures: the tensor names, datatypes and shapes a model serves.

Lives apart from ``manifest`` so that ``zoo`` can build signatures without importing the manifest,
which itself needs the zoo to validate architectures.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.artifacts.datatypes import DATATYPES
from shared.artifacts.errors import ArtifactError

__all__ = ["Signature", "TensorSpec"]

#: Deepest tensor rank a signature may declare; far beyond any real model, it only bounds input.
MAX_RANK = 8


def _is_int(value: object) -> bool:
    # bool is an int subclass, but `true` is never a meaningful dimension.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a signature.

    Attributes:
        name: The tensor name clients use in requests, e.g. ``"input_ids"``.
        datatype: A KServe v2 datatype string, e.g. ``"FP32"``.
        shape: Dimensions, each >= 1, or -1 where the size varies (batch, sequence length).
    """

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ArtifactError(f"tensor name must be a non-empty string, got {self.name!r}")
        if self.datatype not in DATATYPES:
            raise ArtifactError(
                f"tensor '{self.name}': unknown datatype {self.datatype!r} (known: {', '.join(DATATYPES)})"
            )
        if not isinstance(self.shape, (tuple, list)):
            raise ArtifactError(f"tensor '{self.name}': shape must be a list of integers, got {self.shape!r}")
        shape = tuple(self.shape)
        if len(shape) > MAX_RANK:
            raise ArtifactError(f"tensor '{self.name}': shape has {len(shape)} dimensions, at most {MAX_RANK}")
        for dim in shape:
            if not _is_int(dim) or (dim < 1 and dim != -1):
                raise ArtifactError(
                    f"tensor '{self.name}': shape {list(shape)} has dimension {dim!r}; "
                    "each must be an integer >= 1, or -1 for a variable size"
                )
        # Normalise lists to tuples so specs compare equal and stay hashable however they were built.
        object.__setattr__(self, "shape", shape)

    def to_dict(self) -> dict[str, Any]:
        """Returns the JSON-ready form ``{"name", "datatype", "shape"}``."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: object, where: str = "tensor") -> TensorSpec:
        """Builds a spec from its JSON form, rejecting missing, unknown or mistyped keys.

        Args:
            data: The decoded JSON value.
            where: Location prefix for error messages, e.g. ``"signature.inputs[0]"``.

        Raises:
            ArtifactError: If ``data`` is not a valid tensor spec.
        """
        if not isinstance(data, Mapping):
            raise ArtifactError(f"{where} must be an object, got {type(data).__name__}")
        keys = set(data)
        if keys != {"name", "datatype", "shape"}:
            missing, unknown = {"name", "datatype", "shape"} - keys, keys - {"name", "datatype", "shape"}
            detail = "; ".join(
                part
                for part in (
                    f"missing {', '.join(sorted(missing))}" if missing else "",
                    f"unknown {', '.join(sorted(map(str, unknown)))}" if unknown else "",
                )
                if part
            )
            raise ArtifactError(f"{where} must have exactly keys datatype, name, shape ({detail})")
        if not isinstance(data["shape"], list):
            raise ArtifactError(f"{where}.shape must be a list of integers, got {data['shape']!r}")
        try:
            return cls(name=data["name"], datatype=data["datatype"], shape=tuple(data["shape"]))
        except ArtifactError as exc:
            raise ArtifactError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class Signature:
    """The inputs a model takes and the outputs it returns, in order.

    Attributes:
        inputs: Input tensor specs; names are unique.
        outputs: Output tensor specs; names are unique.
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        for side in ("inputs", "outputs"):
            specs = getattr(self, side)
            if not isinstance(specs, (tuple, list)) or not all(isinstance(s, TensorSpec) for s in specs):
                raise ArtifactError(f"signature {side} must be a sequence of TensorSpec")
            if not specs:
                raise ArtifactError(f"signature declares no {side}; at least one is required")
            names = [s.name for s in specs]
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ArtifactError(f"signature {side} repeat tensor names: {', '.join(duplicates)}")
            object.__setattr__(self, side, tuple(specs))

    def to_dict(self) -> dict[str, Any]:
        """Returns the JSON-ready form ``{"inputs": [...], "outputs": [...]}``."""
        return {"inputs": [s.to_dict() for s in self.inputs], "outputs": [s.to_dict() for s in self.outputs]}

    @classmethod
    def from_dict(cls, data: object, where: str = "signature") -> Signature:
        """Builds a signature from its JSON form.

        Raises:
            ArtifactError: If ``data`` is not a valid signature.
        """
        if not isinstance(data, Mapping):
            raise ArtifactError(f"{where} must be an object, got {type(data).__name__}")
        if set(data) != {"inputs", "outputs"}:
            raise ArtifactError(
                f"{where} must have exactly keys inputs, outputs (got {', '.join(sorted(map(str, data)))})"
            )
        sides: dict[str, tuple[TensorSpec, ...]] = {}
        for side in ("inputs", "outputs"):
            items = data[side]
            if not isinstance(items, list):
                raise ArtifactError(f"{where}.{side} must be a list, got {type(items).__name__}")
            sides[side] = tuple(TensorSpec.from_dict(item, f"{where}.{side}[{i}]") for i, item in enumerate(items))
        try:
            return cls(**sides)
        except ArtifactError as exc:
            raise ArtifactError(f"{where}: {exc}") from None

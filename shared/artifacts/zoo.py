"""The built-in architecture zoo: validated arguments, model construction and signatures.

Artifacts never carry code; an artifact names one of these architectures plus its arguments, and the
model is rebuilt from this trusted registry before safetensors weights are loaded into it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from shared.artifacts.argspec import ChoiceArg, IntArg, IntListArg
from shared.artifacts.datatypes import MODEL_DTYPES
from shared.artifacts.decoder import DecoderLM
from shared.artifacts.errors import ArtifactError
from shared.artifacts.layout import storage_layout
from shared.artifacts.nets import ACTIVATIONS, MLP, LSTMClassifier, SmallCNN, TransformerClassifier
from shared.artifacts.registry import Architecture, architectures, get_architecture, register_architecture
from shared.artifacts.signature import Signature, TensorSpec

if TYPE_CHECKING:  # manifest imports this module, so only the type is needed here
    from shared.artifacts.manifest import Manifest

__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "Architecture",
    "architectures",
    "build_model",
    "configure_zoo_limits",
    "expected_state",
    "get_architecture",
    "register_architecture",
    "zoo_max_elements",
]

#: Default of the largest model (total state-dict elements) build_model will allocate: 2e9 float32
#: values is 8 GB, more than any zoo model needs, and refusing early beats an out-of-memory kill of a
#: worker. Each service sets its own from ``MAAS_ZOO_MAX_ELEMENTS`` (:func:`configure_zoo_limits`).
DEFAULT_MAX_ELEMENTS = 2_000_000_000


@dataclass
class _Limits:
    max_elements: int = DEFAULT_MAX_ELEMENTS


# Process-wide: set once by each service's composition root, read by every build.
_limits = _Limits()


def configure_zoo_limits(max_elements: int = DEFAULT_MAX_ELEMENTS) -> None:
    """Sets this process's zoo size caps; each service's composition root calls it once at start.

    Args:
        max_elements: Largest model (total state-dict elements) :func:`build_model` will allocate.

    Raises:
        ValueError: If ``max_elements`` is below 1.
    """
    if max_elements < 1:
        raise ValueError(f"max_elements must be >= 1, got {max_elements}")
    _limits.max_elements = max_elements


def zoo_max_elements() -> int:
    """The largest model (total state-dict elements) :func:`build_model` allocates in this process."""
    return _limits.max_elements


_DIM = 1 << 16  # generous bound for widths and channel counts
_VOCAB = 1 << 20


@functools.lru_cache(maxsize=128)
def _meta_state(architecture_id: str, arguments_json: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    # Keyed by canonical JSON so equal arguments share an entry; the meta device allocates nothing.
    with torch.device("meta"):
        module = get_architecture(architecture_id).build(json.loads(arguments_json))
    return {name: (t.dtype, tuple(t.shape)) for name, t in module.state_dict().items()}


def _float_state(manifest: Manifest) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return _meta_state(manifest.architecture, json.dumps(manifest.arguments, sort_keys=True))


def build_model(manifest: Manifest, device: str | torch.device = "cpu") -> nn.Module:
    """Builds a freshly initialised model for a manifest.

    The module is in training mode (as torch constructs it) and cast to the manifest dtype; int8
    manifests build a float32 model since that is what their weights dequantize to.

    Args:
        manifest: A validated manifest.
        device: Where to allocate; ``"meta"`` gives shapes and dtypes without allocating memory.

    Raises:
        ArtifactError: If the arguments are rejected or the model would exceed :func:`zoo_max_elements`.
    """
    architecture = get_architecture(manifest.architecture)
    device = torch.device(device)
    if device.type != "meta":
        elements = sum(torch.Size(shape).numel() for _, shape in _float_state(manifest).values())
        limit = _limits.max_elements
        if elements > limit:
            raise ArtifactError(
                f"architecture '{manifest.architecture}' with these arguments has {elements:,} weights, "
                f"more than the limit of {limit:,}"
            )
    with device:
        module = architecture.build(manifest.arguments)
    return module.to(MODEL_DTYPES[manifest.dtype])


def expected_state(manifest: Manifest) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Returns the tensors an artifact for this manifest must contain: name -> (safetensors dtype, shape).

    Accounts for the manifest's variant: fp16/bf16 store floating tensors in that dtype, and int8
    stores quantized weights as ``I8`` plus a ``"<name>.__scale__"`` ``F32`` tensor each.
    """
    return storage_layout(_float_state(manifest), manifest.dtype, manifest.quantization)


def _classifier_signature(inputs: TensorSpec, num_classes: int) -> Signature:
    return Signature(inputs=(inputs,), outputs=(TensorSpec("logits", "FP32", (-1, num_classes)),))


def _check_cnn(a: dict[str, Any]) -> None:
    if a["image_size"] < 2 ** len(a["channels"]):
        raise ArtifactError(
            f"architecture 'cnn': image_size {a['image_size']} is too small for {len(a['channels'])} "
            f"pooling stages (needs >= {2 ** len(a['channels'])})"
        )


def _check_heads(architecture_id: str) -> Callable[[dict[str, Any]], None]:
    def check(a: dict[str, Any]) -> None:
        if a["width"] % a["heads"]:
            raise ArtifactError(
                f"architecture '{architecture_id}': width {a['width']} is not divisible by heads {a['heads']}"
            )

    return check


register_architecture(
    Architecture(
        id="mlp",
        description="Fully connected classifier/regressor over flat feature vectors.",
        params={
            "in_features": IntArg(1, _VOCAB),
            "hidden": IntListArg(0, 32, 1, _DIM),
            "out_features": IntArg(1, _VOCAB),
            "activation": ChoiceArg(tuple(ACTIVATIONS)),
        },
        defaults={"in_features": 784, "hidden": [512, 512], "out_features": 10, "activation": "relu"},
        factory=lambda a: MLP(a["in_features"], a["hidden"], a["out_features"], a["activation"]),
        signature_fn=lambda a: Signature(
            inputs=(TensorSpec("input", "FP32", (-1, a["in_features"])),),
            outputs=(TensorSpec("logits", "FP32", (-1, a["out_features"])),),
        ),
    )
)

register_architecture(
    Architecture(
        id="cnn",
        description="Small convnet for square images; defaults fit 8x8 scikit-learn digits.",
        params={
            "in_channels": IntArg(1, 64),
            "image_size": IntArg(1, 1024),
            "channels": IntListArg(1, 8, 1, 4096),
            "num_classes": IntArg(1, _VOCAB),
        },
        defaults={"in_channels": 1, "image_size": 8, "channels": [16, 32], "num_classes": 10},
        factory=lambda a: SmallCNN(a["in_channels"], a["image_size"], a["channels"], a["num_classes"]),
        signature_fn=lambda a: _classifier_signature(
            TensorSpec("input", "FP32", (-1, a["in_channels"], a["image_size"], a["image_size"])),
            a["num_classes"],
        ),
        check=_check_cnn,
    )
)

register_architecture(
    Architecture(
        id="lstm-classifier",
        description="Token embedding + LSTM sequence classifier over variable-length inputs.",
        params={
            "vocab_size": IntArg(1, _VOCAB),
            "embed_dim": IntArg(1, 8192),
            "hidden_size": IntArg(1, 8192),
            "num_layers": IntArg(1, 16),
            "num_classes": IntArg(1, _VOCAB),
        },
        defaults={"vocab_size": 256, "embed_dim": 64, "hidden_size": 128, "num_layers": 1, "num_classes": 2},
        factory=lambda a: LSTMClassifier(
            a["vocab_size"], a["embed_dim"], a["hidden_size"], a["num_layers"], a["num_classes"]
        ),
        signature_fn=lambda a: _classifier_signature(TensorSpec("input_ids", "INT64", (-1, -1)), a["num_classes"]),
    )
)

register_architecture(
    Architecture(
        id="transformer-classifier",
        description="Transformer encoder sequence classifier with learned positions and mean pooling.",
        params={
            "vocab_size": IntArg(1, _VOCAB),
            "seq_len": IntArg(1, 8192),
            "width": IntArg(1, 8192),
            "depth": IntArg(1, 64),
            "heads": IntArg(1, 128),
            "num_classes": IntArg(1, _VOCAB),
        },
        defaults={
            "vocab_size": 1000,
            "seq_len": 128,
            "width": 256,
            "depth": 4,
            "heads": 4,
            "num_classes": 10,
        },
        factory=lambda a: TransformerClassifier(
            a["vocab_size"], a["seq_len"], a["width"], a["depth"], a["heads"], a["num_classes"]
        ),
        signature_fn=lambda a: _classifier_signature(
            TensorSpec("input_ids", "INT64", (-1, a["seq_len"])), a["num_classes"]
        ),
        check=_check_heads("transformer-classifier"),
    )
)

register_architecture(
    Architecture(
        id="decoder-lm",
        description="GPT-style decoder-only causal language model (byte-level by default).",
        params={
            "vocab_size": IntArg(1, _VOCAB),
            "context": IntArg(1, 8192),
            "width": IntArg(1, 8192),
            "depth": IntArg(1, 64),
            "heads": IntArg(1, 128),
        },
        defaults={"vocab_size": 256, "context": 128, "width": 128, "depth": 2, "heads": 4},
        factory=lambda a: DecoderLM(a["vocab_size"], a["context"], a["width"], a["depth"], a["heads"]),
        signature_fn=lambda a: Signature(
            inputs=(TensorSpec("input_ids", "INT64", (-1, -1)),),
            outputs=(TensorSpec("logits", "FP32", (-1, -1, a["vocab_size"])),),
        ),
        check=_check_heads("decoder-lm"),
    )
)

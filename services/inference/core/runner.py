"""Running a loaded torch model: per-request input checks, batched executions, generation steps, warm-up.

Everything here except :meth:`TorchRunner.check` runs on the compute thread.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from services.inference.core.stats import BatchTimings
from shared.artifacts import Manifest, datatype_to_numpy, datatype_to_torch
from shared.errors import InvalidArgument
from shared.kserve.tensors import bf16_to_torch

__all__ = ["TorchRunner", "model_bytes", "resolve_device"]


def resolve_device(requested: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cpu``/``cuda``/``cuda:N`` as given.

    Raises:
        InvalidArgument: If a CUDA device is asked for and none is available, or the name is unknown.
    """
    if requested == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return "cpu"
    if requested == "cuda" or requested.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InvalidArgument(f"device {requested!r} asked for, but no CUDA device is available")
        index = int(requested.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise InvalidArgument(f"device {requested!r} asked for, but only {torch.cuda.device_count()} exist")
        return f"cuda:{index}"
    raise InvalidArgument(f"unknown device {requested!r} (auto, cpu, cuda or cuda:N)")


def model_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (what the memory budget counts)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _to_tensor(array: np.ndarray, datatype: str) -> torch.Tensor:
    if datatype == "BF16":
        return bf16_to_torch(array)
    # Decoded raw arrays view the immutable message bytes; torch wants writable memory.
    return torch.from_numpy(array if array.flags.writeable else array.copy())


class TorchRunner:
    """Executes one loaded zoo model on its device.

    Args:
        module: The model, in eval mode, on ``device``.
        manifest: Its manifest (signature, dtype, architecture arguments).
        device: ``cpu`` or ``cuda:N``.
    """

    def __init__(self, module: nn.Module, manifest: Manifest, device: str) -> None:
        self.module = module
        self.manifest = manifest
        self.signature = manifest.signature
        self.device = torch.device(device)
        first = next(iter(module.parameters()), None)
        self.dtype = first.dtype if first is not None else torch.float32
        args = manifest.arguments
        self.vocab_size: int | None = args.get("vocab_size")
        # The longest sequence the model attends over (decoder-lm's context); None when unbounded or fixed.
        self.context: int | None = args.get("context")
        self.streaming = manifest.architecture == "decoder-lm"

    def check(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Rejects values the model would fail on (token ids outside the vocabulary, over-long sequences).

        Raises:
            InvalidArgument: Naming the input.
        """
        if self.vocab_size is None:
            return
        for spec in self.signature.inputs:
            array = inputs[spec.name]
            if spec.datatype not in ("INT64", "INT32") or not array.size:
                continue
            low, high = int(array.min()), int(array.max())
            if low < 0 or high >= self.vocab_size:
                raise InvalidArgument(
                    f"input '{spec.name}': token ids must be in [0, {self.vocab_size}), got values in [{low}, {high}]"
                )
            if self.context is not None and array.ndim == 2 and array.shape[1] > self.context:
                raise InvalidArgument(
                    f"input '{spec.name}': {array.shape[1]} tokens exceed the model's context of {self.context}"
                )
            if array.ndim == 2 and array.shape[1] == 0:
                raise InvalidArgument(f"input '{spec.name}': at least one token is needed")

    def _prepare(self, inputs: Mapping[str, np.ndarray]) -> list[torch.Tensor]:
        tensors = []
        for spec in self.signature.inputs:
            tensor = _to_tensor(inputs[spec.name], spec.datatype)
            if tensor.is_floating_point() and tensor.dtype != self.dtype:
                tensor = tensor.to(self.dtype)  # fp16/bf16 variants keep an FP32 signature: cast at the boundary
            tensors.append(tensor.to(self.device, non_blocking=True))
        return tensors

    def __call__(self, inputs: Mapping[str, np.ndarray], timings: BatchTimings) -> dict[str, np.ndarray]:
        """One batched execution (the dynamic batcher's runner)."""
        started = time.perf_counter_ns()
        tensors = self._prepare(inputs)
        prepared = time.perf_counter_ns()
        with torch.inference_mode():
            result: Any = self.module(*tensors)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        inferred = time.perf_counter_ns()
        values = result if isinstance(result, (tuple, list)) else (result,)
        outputs: dict[str, np.ndarray] = {}
        for spec, value in zip(self.signature.outputs, values, strict=False):
            dtype = datatype_to_torch(spec.datatype)
            outputs[spec.name] = value.detach().to("cpu", dtype or value.dtype).numpy()
        finished = time.perf_counter_ns()
        timings.input_ns += prepared - started
        timings.infer_ns += inferred - prepared
        timings.output_ns += finished - inferred
        return outputs

    def next_token(self, tokens: list[int]) -> int:
        """One greedy decoding step of a decoder LM (as ``greedy_generate`` does it): the next token id."""
        context = self.context or len(tokens)
        window = torch.tensor([tokens[-context:]], dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            return int(self.module(window)[0, -1].argmax())

    def warmup_inputs(self) -> dict[str, np.ndarray] | None:
        """A batch of one built from the signature (-1 dims -> 1, token ids 0); None if it has BYTES inputs."""
        inputs: dict[str, np.ndarray] = {}
        for spec in self.signature.inputs:
            if spec.datatype == "BYTES":
                return None
            shape = tuple(1 if d == -1 else d for d in spec.shape)
            dtype = np.dtype(np.uint16) if spec.datatype == "BF16" else datatype_to_numpy(spec.datatype)
            inputs[spec.name] = np.zeros(shape, dtype=dtype)
        return inputs

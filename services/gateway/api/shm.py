"""Requests that use Triton's system shared memory: their inputs read from, their outputs written to, regions.

Triton's clients mark a tensor with the parameters ``shared_memory_region``, ``shared_memory_byte_size``
and (when not 0) ``shared_memory_offset`` instead of sending its data; such an input takes no entry in
``raw_input_contents`` (the others keep their order). The gateway resolves each window against the caller's
regions (bounds, tenant), then either

* passes the windows on to the worker by reference (an InferStream entry's ``shared_memory``) when the
  worker shares the gateway's host: the worker maps the same objects, reads its inputs and writes its
  outputs there, and no tensor byte crosses the hop; or
* inlines the inputs into the request it forwards (``raw_input_contents``) and copies the outputs of the
  worker's answer into their windows.

Either way the client gets what Triton answers: the outputs' metadata with an empty entry in
``raw_output_contents`` for each output written to shared memory, and the window in the output's
parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from inference import grpc_service_pb2 as kpb
from maas.inference.v1 import worker_pb2 as wpb

from services.gateway.core.shm import SharedMemoryRegions, Window
from shared.errors import InvalidArgument
from shared.kserve.codec import mark_shared_output

REGION = "shared_memory_region"
BYTE_SIZE = "shared_memory_byte_size"
OFFSET = "shared_memory_offset"
_KEYS = (REGION, BYTE_SIZE, OFFSET)


def uses_shared_memory(request: kpb.ModelInferRequest) -> bool:
    """Whether any input or requested output of ``request`` names a shared-memory region."""
    return any(REGION in t.parameters for t in request.inputs) or any(REGION in o.parameters for o in request.outputs)


def _int(parameters: object, key: str, what: str, default: int | None = None) -> int:
    params = parameters  # a protobuf map of InferParameter
    if key not in params:  # type: ignore[operator]
        if default is None:
            raise InvalidArgument(f"{what}: parameter '{key}' is required with '{REGION}'")
        return default
    parameter = params[key]  # type: ignore[index]
    choice = parameter.WhichOneof("parameter_choice")
    if choice not in ("int64_param", "uint64_param"):
        raise InvalidArgument(f"{what}: parameter '{key}' must be an integer")
    value = int(getattr(parameter, choice))
    if value < 0:
        raise InvalidArgument(f"{what}: parameter '{key}' must be >= 0, got {value}")
    return value


def _window(regions: SharedMemoryRegions, tenant: str, parameters: object, what: str) -> Window:
    region = parameters[REGION]  # type: ignore[index]
    if region.WhichOneof("parameter_choice") != "string_param" or not region.string_param:
        raise InvalidArgument(f"{what}: parameter '{REGION}' must name a registered region")
    byte_size = _int(parameters, BYTE_SIZE, what)
    offset = _int(parameters, OFFSET, what, default=0)
    return regions.window(tenant, region.string_param, offset, byte_size, what)


@dataclass
class SharedMemoryRequest:
    """One request's shared-memory windows, resolved and bounds-checked.

    Attributes:
        raw: Every input's raw contents in input order (views of the windows for shared-memory inputs).
        inputs: The window of each shared-memory input, by input name.
        outputs: The window of each output to write to shared memory, by output name, with the region's
            name and the offset in it (for the response's parameters).
    """

    raw: list[bytes | memoryview]
    inputs: dict[str, Window] = field(default_factory=dict)
    outputs: dict[str, tuple[Window, str, int]] = field(default_factory=dict)

    @classmethod
    def resolve(cls, request: kpb.ModelInferRequest, regions: SharedMemoryRegions, tenant: str) -> SharedMemoryRequest:
        """Resolves every shared-memory input and output of ``request`` in ``tenant``'s regions.

        Raises:
            NotFound: A region is not one of the tenant's.
            InvalidArgument: A window outside its region, a malformed parameter, data sent both ways, or
                a mix of typed contents and shared memory.
        """
        plan = cls(raw=[])
        given = list(request.raw_input_contents)
        next_raw = 0
        for tensor in request.inputs:
            what = f"input '{tensor.name}'"
            if REGION in tensor.parameters:
                if tensor.HasField("contents") and tensor.contents.ListFields():
                    raise InvalidArgument(f"{what}: data given both in contents and in shared memory")
                window = _window(regions, tenant, tensor.parameters, what)
                plan.inputs[tensor.name] = window
                plan.raw.append(window.data)
            elif next_raw < len(given):
                plan.raw.append(given[next_raw])
                next_raw += 1
            else:
                raise InvalidArgument(
                    f"{what}: beside shared-memory inputs, every other input needs its data in raw_input_contents"
                )
        if next_raw != len(given):
            raise InvalidArgument(
                f"raw_input_contents holds {len(given)} tensors but {next_raw} inputs are not in shared memory"
            )
        for output in request.outputs:
            if REGION in output.parameters:
                what = f"output '{output.name}'"
                window = _window(regions, tenant, output.parameters, what)
                offset = _int(output.parameters, OFFSET, what, default=0)
                plan.outputs[output.name] = (window, output.parameters[REGION].string_param, offset)
        return plan

    def inline(self, request: kpb.ModelInferRequest) -> bytes:
        """The request to forward with the inputs' data copied in and every shared-memory parameter gone."""
        forward = kpb.ModelInferRequest()
        forward.CopyFrom(request)
        del forward.raw_input_contents[:]
        forward.raw_input_contents.extend(bytes(data) for data in self.raw)
        self._strip(forward)
        return forward.SerializeToString()

    def by_reference(self, request: kpb.ModelInferRequest) -> tuple[bytes, bytes]:
        """The request to forward without the shared-memory parameters, and the windows (a serialized
        ``maas.inference.v1.SharedMemoryTensors``) for a worker on this host to map itself."""
        forward = kpb.ModelInferRequest()
        forward.CopyFrom(request)
        self._strip(forward)
        tensors = wpb.SharedMemoryTensors()
        for name, window in self.inputs.items():
            tensors.inputs.append(_reference(name, window))
        for name, (window, region, offset) in self.outputs.items():
            reference = _reference(name, window)
            reference.region = region
            reference.region_offset = offset
            tensors.outputs.append(reference)
        return forward.SerializeToString(), tensors.SerializeToString()

    @staticmethod
    def _strip(forward: kpb.ModelInferRequest) -> None:
        for tensor in forward.inputs:
            for key in _KEYS:
                tensor.parameters.pop(key, None)
        for output in forward.outputs:
            for key in _KEYS:
                output.parameters.pop(key, None)

    def write_outputs(self, response_bytes: bytes) -> bytes:
        """Copies the worker's outputs that go to shared memory into their windows; returns the response
        to send to the client (those outputs' raw contents empty, their windows in their parameters).

        Raises:
            InvalidArgument: An output is larger than its window.
        """
        if not self.outputs:
            return response_bytes
        response = kpb.ModelInferResponse.FromString(response_bytes)
        for index, output in enumerate(response.outputs):
            target = self.outputs.get(output.name)
            if target is None or index >= len(response.raw_output_contents):
                continue
            window, region, offset = target
            data = response.raw_output_contents[index]
            if len(data) > window.byte_size:
                raise InvalidArgument(
                    f"output '{output.name}': {len(data)} bytes do not fit its shared-memory window of "
                    f"{window.byte_size} bytes (region '{region}')"
                )
            window.data[: len(data)] = data
            response.raw_output_contents[index] = b""
            mark_shared_output(output, region, len(data), offset)
        return response.SerializeToString()


def _reference(name: str, window: Window) -> wpb.SharedMemoryTensor:
    return wpb.SharedMemoryTensor(
        name=name,
        key=window.key,
        offset=window.offset,
        byte_size=window.byte_size,
        device=window.identity.device,
        inode=window.identity.inode,
    )

"""The worker's end of Triton's system shared memory: tensors the gateway passes by reference.

The gateway resolves a client's shared-memory regions (tenant, bounds) and, when this worker shares its
host, names each tensor's window of a POSIX shared-memory object in the InferStream entry instead of
sending its bytes. The worker maps the objects (once: mappings are kept, most recently used first, so
that a client reusing its regions pays no page-table set-up per request), reads its inputs there without a
copy and writes its outputs there with one. A window is used only if the object opened here is the very
one the gateway opened (same device and inode); otherwise (another host, another /dev/shm) the answer is
FAILED_PRECONDITION with reason SHARED_MEMORY_UNREACHABLE, and the gateway sends the data inline.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from inference import grpc_service_pb2 as kpb
from maas.inference.v1 import worker_pb2 as wpb

from shared.errors import FailedPrecondition, InvalidArgument, MaasError
from shared.kserve.codec import encode_response, mark_shared_output, raw_output, write_raw_output
from shared.kserve.metadata import SHARED_MEMORY_UNREACHABLE
from shared.kserve.shm import SHM_ROOT, FileIdentity, SharedMemoryFile


def _unreachable(key: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"shared-memory object '{key}' is not reachable from this worker", reason=SHARED_MEMORY_UNREACHABLE
    )


class SharedMemoryMaps:
    """The shared-memory objects this worker has mapped, least recently used dropped first.

    Args:
        max_objects: Objects kept mapped at once.
        root: Directory of the objects.
    """

    def __init__(self, max_objects: int = 64, root: str = SHM_ROOT) -> None:
        self._max_objects = max_objects
        self._root = root
        self._files: OrderedDict[str, SharedMemoryFile] = OrderedDict()

    def window(self, tensor: wpb.SharedMemoryTensor) -> memoryview:
        """The tensor's window, mapped here.

        Raises:
            FailedPrecondition: SHARED_MEMORY_UNREACHABLE when this worker does not see the gateway's
                object; plain when the object was truncated.
        """
        identity = FileIdentity(tensor.device, tensor.inode)
        end = tensor.offset + tensor.byte_size
        file = self._files.get(tensor.key)
        if file is not None and (file.identity != identity or file.limit < end):
            del self._files[tensor.key]
            file.close()  # a new object under the old key, or one grown since: map it again
            file = None
        if file is None:
            try:
                file = SharedMemoryFile(tensor.key, None, self._root)
            except MaasError:  # not there, or not openable here: not the gateway's object
                raise _unreachable(tensor.key) from None
            if file.identity != identity or file.limit < end:
                file.close()
                raise _unreachable(tensor.key)
            self._files[tensor.key] = file
            while len(self._files) > self._max_objects:
                self._files.popitem(last=False)[1].close()
        else:
            self._files.move_to_end(tensor.key)
        return file.window(tensor.offset, tensor.byte_size)

    def close(self) -> None:
        while self._files:
            self._files.popitem()[1].close()


def raw_inputs(
    request: kpb.ModelInferRequest, tensors: wpb.SharedMemoryTensors, maps: SharedMemoryMaps
) -> list[bytes | memoryview]:
    """Every input's raw contents in input order: windows for the shared-memory inputs, the request's
    ``raw_input_contents`` (in their order) for the others.

    Raises:
        InvalidArgument: The request's raw contents do not cover the other inputs.
    """
    shared = {t.name: t for t in tensors.inputs}
    given = request.raw_input_contents
    raw: list[bytes | memoryview] = []
    next_raw = 0
    for tensor in request.inputs:
        reference = shared.get(tensor.name)
        if reference is not None:
            raw.append(maps.window(reference))
        elif next_raw < len(given):
            raw.append(given[next_raw])
            next_raw += 1
        else:
            raise InvalidArgument(f"input '{tensor.name}': no data (neither in shared memory nor raw)")
    return raw


def encode_shared_response(
    request: kpb.ModelInferRequest,
    model_version: str,
    outputs: Mapping[str, np.ndarray | torch.Tensor],
    tensors: Sequence[wpb.SharedMemoryTensor],
    maps: SharedMemoryMaps,
) -> kpb.ModelInferResponse:
    """The response to ``request``: outputs with a window written there (one copy each, raw contents left
    empty, the window in their parameters), the others in ``raw_output_contents``.

    Raises:
        InvalidArgument: An output is missing or does not fit its window.
    """
    if not tensors:
        return encode_response(request, model_version, outputs)
    shared = {t.name: t for t in tensors}
    names = [o.name for o in request.outputs] or list(outputs)
    response = kpb.ModelInferResponse(model_name=request.model_name, model_version=model_version, id=request.id)
    for name in names:
        if name not in outputs:
            raise InvalidArgument(f"output '{name}' was not produced (produced: {', '.join(outputs)})")
        reference = shared.get(name)
        if reference is None:
            datatype, shape, data = raw_output(outputs[name])
            response.outputs.add(name=name, datatype=datatype, shape=shape)
            response.raw_output_contents.append(data)
            continue
        datatype, shape, written = write_raw_output(outputs[name], maps.window(reference), name)
        output = response.outputs.add(name=name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(b"")
        mark_shared_output(output, reference.region, written, reference.region_offset)
    return response

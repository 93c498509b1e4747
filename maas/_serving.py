"""Inference through the gateway (KServe v2 gRPC): ``client.infer`` and ``client.generate``."""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator, Mapping
from typing import Any

import numpy as np
from inference import grpc_service_pb2 as kpb
from maas._rpc import Connection
from maas.tensors import add_input, decode_outputs, named_inputs

from shared.errors import InvalidArgument
from shared.grpc.calls import new_request_id
from shared.grpc.status import STREAM_ERROR_CODE, STREAM_ERROR_REASON, error_from_code


class Serving:
    """The gateway's data plane, with each model's metadata cached (its input names and datatypes)."""

    def __init__(self, gateway: Connection) -> None:
        self._gateway = gateway
        self._metadata: dict[tuple[str, str], kpb.ModelMetadataResponse] = {}

    async def metadata(self, model: str, version: str = "") -> kpb.ModelMetadataResponse:
        """A deployed model's inputs and outputs (names, datatypes, shapes)."""
        request = kpb.ModelMetadataRequest(name=model, version=version)
        response: kpb.ModelMetadataResponse = await self._gateway.call("ModelMetadata", request)
        self._metadata[(model, version)] = response
        return response

    async def ready(self, model: str, version: str = "", *, timeout: float | None = None) -> bool:
        """Whether the gateway can serve ``model`` now."""
        request = kpb.ModelReadyRequest(name=model, version=version)
        response: kpb.ModelReadyResponse = await self._gateway.call("ModelReady", request, timeout=timeout)
        return response.ready

    async def infer_response(
        self, model: str, inputs: Mapping[str, Any] | Any, version: str = ""
    ) -> kpb.ModelInferResponse:
        """Run one inference; the raw KServe response (see :meth:`infer` for arrays)."""
        metadata = self._metadata.get((model, version)) or await self.metadata(model, version)
        declared = {t.name: t.datatype for t in metadata.inputs}
        request = kpb.ModelInferRequest(model_name=model, model_version=version)
        for name, value in named_inputs(inputs, list(declared)).items():
            add_input(request, name, value, declared.get(name))
        response: kpb.ModelInferResponse = await self._gateway.call("ModelInfer", request)
        return response

    async def infer(self, model: str, inputs: Mapping[str, Any] | Any, version: str = "") -> dict[str, np.ndarray]:
        """Run one inference and return the outputs by name as numpy arrays."""
        return decode_outputs(await self.infer_response(model, inputs, version))

    async def generate(self, model: str, prompt: str, *, max_tokens: int = 64, version: str = "") -> AsyncIterator[str]:
        """Stream a continuation of ``prompt`` from a byte-level generative model, piece by piece as decoded
        text (a piece is empty while a multi-byte character is incomplete, so none is yielded then)."""
        ids = np.frombuffer(prompt.encode(), dtype=np.uint8).astype(np.int64).reshape(1, -1)
        if ids.size == 0:
            raise InvalidArgument("the prompt is empty")
        request = kpb.ModelInferRequest(model_name=model, model_version=version, id="generate")
        request.inputs.add(name="input_ids", datatype="INT64", shape=list(ids.shape))
        request.raw_input_contents.append(ids.tobytes())
        request.parameters["max_tokens"].int64_param = max_tokens
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        async def requests() -> AsyncIterator[kpb.ModelInferRequest]:
            yield request

        request_id = new_request_id()
        replies = self._gateway.stream("ModelStreamInfer", requests(), request_id=request_id)
        try:
            async for reply in replies:
                if reply.error_message:
                    parameters = reply.infer_response.parameters
                    code = parameters.get(STREAM_ERROR_CODE)
                    reason = parameters.get(STREAM_ERROR_REASON)
                    error = error_from_code(
                        code.string_param if code is not None else "INVALID_ARGUMENT",
                        reply.error_message,
                        reason.string_param if reason is not None else None,
                    )
                    error.request_id = request_id
                    raise error
                for token in decode_outputs(reply.infer_response).get("token_id", np.empty(0)).ravel():
                    text = decoder.decode(bytes([int(token) & 0xFF]))
                    if text:
                        yield text
                final = reply.infer_response.parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    break
        finally:
            await replies.aclose()
        rest = decoder.decode(b"", final=True)
        if rest:
            yield rest

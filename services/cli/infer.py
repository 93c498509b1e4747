"""``maas infer`` and ``maas generate``: call a deployed model through the gateway (KServe v2 gRPC)."""

from __future__ import annotations

import codecs
import sys
from pathlib import Path

import grpc
import numpy as np
import typer
from inference import grpc_service_pb2 as kpb

from services.cli.common import Gateway, console, out, run_async
from shared.artifacts import datatype_to_numpy, numpy_to_datatype
from shared.errors import InvalidArgument
from shared.grpc.status import from_rpc_error


def _inputs(specs: list[str], metadata: kpb.ModelMetadataResponse) -> dict[str, np.ndarray]:
    """``x.npy`` (the model's only input) or ``NAME=x.npy`` per input, cast to the declared datatype."""
    names = [t.name for t in metadata.inputs]
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        name, sep, path = spec.rpartition("=")
        if not sep:
            if len(names) != 1:
                raise InvalidArgument(f"the model takes inputs {', '.join(names)}: pass --input NAME=FILE.npy each")
            name = names[0]
        if name not in names:
            raise InvalidArgument(f"the model has no input {name!r} (inputs: {', '.join(names)})")
        arrays[name] = np.load(Path(path), allow_pickle=False)
    return arrays


def _request(model: str, version: str, arrays: dict[str, np.ndarray], metadata: kpb.ModelMetadataResponse) -> object:
    request = kpb.ModelInferRequest(model_name=model, model_version=version)
    declared = {t.name: t.datatype for t in metadata.inputs}
    for name, array in arrays.items():
        dtype = datatype_to_numpy(declared[name])
        if dtype is None:
            raise InvalidArgument(f"input {name!r} has datatype {declared[name]}, which this command cannot send")
        array = np.ascontiguousarray(array.astype(dtype, copy=False))
        request.inputs.add(name=name, datatype=numpy_to_datatype(array.dtype), shape=list(array.shape))
        request.raw_input_contents.append(array.tobytes())
    return request


def decode_outputs(response: kpb.ModelInferResponse) -> dict[str, np.ndarray]:
    """The response's outputs as arrays (BF16 widened to float32: numpy has no bfloat16)."""
    arrays = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if tensor.datatype == "BF16":
            array = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            dtype = datatype_to_numpy(tensor.datatype)
            if dtype is None:
                raise InvalidArgument(f"output {tensor.name!r} has datatype {tensor.datatype}, not decodable here")
            array = np.frombuffer(raw, dtype=dtype)
        arrays[tensor.name] = array.reshape(list(tensor.shape))
    return arrays


@run_async
async def infer(
    model: str = typer.Argument(..., help="Deployed model name."),
    input: list[str] = typer.Option(..., help="x.npy (the only input) or NAME=x.npy, repeated per input."),
    version: str = typer.Option("", help="Version number or alias (default: the deployment's)."),
    output: Path | None = typer.Option(None, help="Also save the outputs to this .npz file."),
) -> None:
    """Run one inference through the gateway and print the outputs (argmax for class scores)."""
    async with Gateway() as gateway:
        metadata = await gateway.call("ModelMetadata", kpb.ModelMetadataRequest(name=model, version=version))
        arrays = _inputs(input, metadata)
        response = await gateway.call("ModelInfer", _request(model, version, arrays, metadata))
    outputs = decode_outputs(response)
    out.print(f"{response.model_name}@{response.model_version}", highlight=False)
    for name, array in outputs.items():
        out.print(f"{name} {array.dtype} {list(array.shape)}", highlight=False)
        with np.printoptions(precision=4, suppress=True, threshold=64):
            out.print(array, highlight=False)
        if array.ndim == 2 and array.dtype.kind == "f":
            out.print(f"argmax: {array.argmax(axis=1).tolist()}", highlight=False)
    if output is not None:
        np.savez(output, **outputs)  # type: ignore[arg-type]


@run_async
async def generate(
    model: str = typer.Argument(..., help="Deployed generative model (zoo decoder-lm, byte-level)."),
    prompt: str = typer.Argument(..., help="Text to continue."),
    max_tokens: int = typer.Option(64, help="Tokens to generate at most."),
    version: str = typer.Option("", help="Version number or alias (default: the deployment's)."),
) -> None:
    """Stream a continuation of the prompt token by token (ModelStreamInfer)."""
    ids = np.frombuffer(prompt.encode(), dtype=np.uint8).astype(np.int64).reshape(1, -1)
    if ids.size == 0:
        raise InvalidArgument("the prompt is empty")
    request = kpb.ModelInferRequest(model_name=model, model_version=version, id="generate")
    request.inputs.add(name="input_ids", datatype="INT64", shape=list(ids.shape))
    request.raw_input_contents.append(ids.tobytes())
    request.parameters["max_tokens"].int64_param = max_tokens
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    sys.stdout.write(prompt)
    async with Gateway() as gateway:

        async def requests():
            yield request

        try:
            async for reply in gateway.stub.ModelStreamInfer(requests()):
                if reply.error_message:
                    raise InvalidArgument(reply.error_message)
                final = reply.infer_response.parameters.get("triton_final_response")
                for token in decode_outputs(reply.infer_response).get("token_id", np.empty(0)).ravel():
                    sys.stdout.write(decoder.decode(bytes([int(token) & 0xFF])))
                    sys.stdout.flush()
                if final is not None and final.bool_param:
                    break
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
    sys.stdout.write(decoder.decode(b"", final=True) + "\n")
    console.print(f"[dim]{model}: done[/]")

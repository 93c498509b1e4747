"""Exercise a KServe v2 gRPC server with Triton's own Python client; print one JSON document of results.

Run as a standalone script, never imported by pytest: tritonclient's generated code registers the same
``inference.*`` protobuf symbols as the project's stubs, and one process cannot hold both.

    python tests/contract/kserve_client/triton_checks.py --url 127.0.0.1:8001 --model mlp --version 1 \
        --alias prod --stream-model lm --load-model spare

Every check runs even when an earlier one failed. Each result is ``{"ok": bool, "value": ...}`` on success
or ``{"ok": false, "status": "StatusCode.X", "message": "..."}`` when the server answered with an error;
the caller asserts on them (values, status codes, messages). The inputs are generated here from a seed
and included in the output, so the caller can compare the predictions with its own forward pass. The
script exits 0 whatever the server answered; non-zero only if it could not run at all.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

TIMEOUT_S = 30.0
LOAD_TIMEOUT_S = 300.0


class Checks:
    """Runs named checks, recording a value or the server's error for each."""

    def __init__(self) -> None:
        self.results: dict[str, dict[str, Any]] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        try:
            value = fn()
        except InferenceServerException as exc:
            self.results[name] = {"ok": False, "status": str(exc.status()), "message": exc.message()}
            return None
        except Exception as exc:
            self.results[name] = {"ok": False, "status": None, "message": f"{type(exc).__name__}: {exc}"}
            return None
        self.results[name] = {"ok": True, "value": value, "seconds": round(time.perf_counter() - started, 3)}
        return value


def fp32_input(name: str, data: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)  # binary: sent as raw_input_contents
    return tensor


def infer_value(result: grpcclient.InferResult, output: str) -> dict[str, Any]:
    response = result.get_response()
    return {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "id": response.id,
        "outputs": [o.name for o in response.outputs],
        output: result.as_numpy(output).tolist(),
    }


def stream_tokens(client: grpcclient.InferenceServerClient, model: str, prompt: list[int], max_tokens: int) -> dict:
    """One generation through start_stream + async_stream_infer; tokens until the empty final response."""
    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)), stream_timeout=120)
    try:
        ids = grpcclient.InferInput("input_ids", [1, len(prompt)], "INT64")
        ids.set_data_from_numpy(np.asarray([prompt], dtype=np.int64))
        try:
            client.async_stream_infer(
                model,
                [ids],
                request_id="stream-1",
                enable_empty_final_response=True,
                parameters={"max_tokens": max_tokens},
            )
        except InferenceServerException:
            # The stream broke before the request went out; the callback holds the server's error.
            _, error = responses.get(timeout=5)
            raise error from None
        tokens: list[int] = []
        ids_seen: set[str] = set()
        errors: list[str] = []
        final = False
        deadline = time.monotonic() + 120
        while not final and time.monotonic() < deadline:
            result, error = responses.get(timeout=max(0.1, deadline - time.monotonic()))
            if error is not None:
                errors.append(str(error))
                break
            response = result.get_response()
            ids_seen.add(response.id)
            if any(o.name == "token_id" for o in response.outputs):
                token = result.as_numpy("token_id")
                tokens.append(int(token.reshape(-1)[0]))
            parameter = response.parameters.get("triton_final_response")
            final = parameter is not None and parameter.bool_param
        return {"tokens": tokens, "final_seen": final, "ids": sorted(ids_seen), "errors": errors}
    finally:
        client.stop_stream()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="host:port of the KServe v2 gRPC server.")
    parser.add_argument("--model", required=True, help="A deployed model with one FP32 input 'input' [-1, N].")
    parser.add_argument("--version", default="1", help="A version number the model serves.")
    parser.add_argument("--alias", default="", help="An alias of that version (skipped if empty).")
    parser.add_argument("--stream-model", default="", help="A deployed decoder-lm (skipped if empty).")
    parser.add_argument("--load-model", default="", help="A registry model to load_model + unload_model.")
    parser.add_argument("--prompt", default="1,2,3,4,5", help="Comma-separated token ids for the stream.")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=0, help="Features of the input (0: from the model metadata).")
    args = parser.parse_args()

    client = grpcclient.InferenceServerClient(url=args.url)
    checks = Checks()
    run = checks.run
    t = TIMEOUT_S

    run("server_live", lambda: client.is_server_live(client_timeout=t))
    run("server_ready", lambda: client.is_server_ready(client_timeout=t))
    run("server_metadata", lambda: client.get_server_metadata(as_json=True, client_timeout=t))
    run("model_ready", lambda: client.is_model_ready(args.model, client_timeout=t))
    run("model_ready_version", lambda: client.is_model_ready(args.model, args.version, client_timeout=t))
    run("model_ready_unknown", lambda: client.is_model_ready("no-such-model", client_timeout=t))
    run("model_metadata", lambda: client.get_model_metadata(args.model, as_json=True, client_timeout=t))
    run("model_config", lambda: client.get_model_config(args.model, as_json=True, client_timeout=t))

    metadata = checks.results["model_metadata"].get("value") or {}
    width = args.width or (int(metadata["inputs"][0]["shape"][-1]) if metadata.get("inputs") else 4)
    output = metadata["outputs"][0]["name"] if metadata.get("outputs") else "logits"
    rng = np.random.default_rng(args.seed)
    x1 = rng.standard_normal((1, width), dtype=np.float32)
    x4 = rng.standard_normal((4, width), dtype=np.float32)
    inputs: dict[str, Any] = {"x1": x1.tolist(), "x4": x4.tolist()}

    def infer(data: np.ndarray, version: str = "", requested: bool = False, request_id: str = "") -> dict:
        outputs = [grpcclient.InferRequestedOutput(output)] if requested else None
        result = client.infer(
            args.model,
            [fp32_input("input", data)],
            model_version=version,
            outputs=outputs,
            request_id=request_id,
            client_timeout=t,
        )
        return infer_value(result, output)

    run("infer", lambda: infer(x1, request_id="req-1"))
    run("infer_batch4", lambda: infer(x4))
    run("infer_requested_outputs", lambda: infer(x1, requested=True))
    run("infer_version_number", lambda: infer(x1, version=args.version))
    if args.alias:
        run("infer_version_alias", lambda: infer(x1, version=args.alias))
    run("infer_unknown_version", lambda: infer(x1, version="999"))
    run(
        "infer_unknown_model",
        lambda: client.infer("no-such-model", [fp32_input("input", x1)], client_timeout=t).get_response().id,
    )
    bad_shape = np.zeros((1, width + 1), dtype=np.float32)
    run("infer_wrong_shape", lambda: infer(bad_shape))

    def wrong_name() -> str:
        return client.infer(args.model, [fp32_input("nope", x1)], client_timeout=t).get_response().id

    run("infer_wrong_input_name", wrong_name)

    if args.stream_model:
        prompt = [int(v) for v in args.prompt.split(",")]
        inputs["prompt"] = prompt
        run("stream", lambda: stream_tokens(client, args.stream_model, prompt, args.max_tokens))

    run("statistics", lambda: client.get_inference_statistics(args.model, as_json=True, client_timeout=t))
    run("statistics_all", lambda: client.get_inference_statistics(as_json=True, client_timeout=t))
    run("repository_index", lambda: client.get_model_repository_index(as_json=True, client_timeout=t))

    if args.load_model:
        name = args.load_model
        run("load_model", lambda: client.load_model(name, client_timeout=LOAD_TIMEOUT_S))
        run("load_model_ready", lambda: client.is_model_ready(name, client_timeout=t))

        def infer_loaded() -> dict:
            result = client.infer(name, [fp32_input("input", x1)], client_timeout=t)
            return infer_value(result, output)

        run("load_model_infer", infer_loaded)
        run("unload_model", lambda: client.unload_model(name, client_timeout=LOAD_TIMEOUT_S))

        def ready_after_unload() -> bool:
            # Unloading deletes the deployment; the gateway learns it from its next endpoint snapshot.
            deadline = time.monotonic() + 30
            while True:
                try:
                    ready = client.is_model_ready(name, client_timeout=t)
                except InferenceServerException:
                    ready = False
                if not ready or time.monotonic() > deadline:
                    return bool(ready)
                time.sleep(0.2)

        run("unload_model_ready", ready_after_unload)
    run("unload_unknown", lambda: client.unload_model("no-such-model", client_timeout=t))

    client.close()
    json.dump({"inputs": inputs, "checks": checks.results}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

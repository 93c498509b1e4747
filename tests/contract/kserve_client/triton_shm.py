"""Triton's system shared-memory utilities, unchanged, against a maas gateway; prints one JSON document.

Run as a standalone script (tritonclient's generated code cannot share a process with the project's stubs):

    python tests/contract/kserve_client/triton_shm.py --url 127.0.0.1:8001 --model mlp --width 16

What Triton's own example (``simple_grpc_shm_client.py``) does: create regions with
``tritonclient.utils.shared_memory``, copy the input in, register both regions, infer with the input and the
output in shared memory, read the output from its region, unregister, destroy. Then the bad cases: an
unknown region, a window past the region's end, a region used after it was unregistered. Each check is
``{"ok": true, "value": ...}`` or ``{"ok": false, "status": "StatusCode.X", "message": "..."}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

TIMEOUT_S = 30.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True, help="A deployed model with one FP32 input [-1, width].")
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    client = grpcclient.InferenceServerClient(url=args.url)
    checks: dict[str, dict[str, Any]] = {}

    def run(name: str, fn: Callable[[], Any]) -> Any:
        try:
            value = fn()
        except InferenceServerException as exc:
            checks[name] = {"ok": False, "status": str(exc.status()), "message": exc.message()}
            return None
        checks[name] = {"ok": True, "value": value}
        return value

    metadata = client.get_model_metadata(args.model, client_timeout=TIMEOUT_S)
    input_name, output_name = metadata.inputs[0].name, metadata.outputs[0].name
    x = np.random.default_rng(args.seed).standard_normal((args.batch, args.width), dtype=np.float32)
    out_bytes = 1 << 16  # larger than the output: Triton's clients size output regions generously
    suffix = f"{os.getpid()}"
    in_handle = shm.create_shared_memory_region("input_data", f"/maas_e2e_in_{suffix}", x.nbytes)
    out_handle = shm.create_shared_memory_region("output_data", f"/maas_e2e_out_{suffix}", out_bytes)
    try:
        shm.set_shared_memory_region(in_handle, [x])
        run("extensions", lambda: list(client.get_server_metadata(client_timeout=TIMEOUT_S).extensions))
        run("unregister_all_first", lambda: client.unregister_system_shared_memory(client_timeout=TIMEOUT_S))
        run(
            "register_input",
            lambda: client.register_system_shared_memory(
                "input_data", f"/maas_e2e_in_{suffix}", x.nbytes, client_timeout=TIMEOUT_S
            ),
        )
        run(
            "register_output",
            lambda: client.register_system_shared_memory(
                "output_data", f"/maas_e2e_out_{suffix}", out_bytes, client_timeout=TIMEOUT_S
            ),
        )

        def status() -> dict[str, Any]:
            response = client.get_system_shared_memory_status(client_timeout=TIMEOUT_S)
            return {
                name: {"key": r.key, "offset": r.offset, "byte_size": r.byte_size}
                for name, r in response.regions.items()
            }

        run("status", status)

        def infer(region: str = "input_data", byte_size: int = x.nbytes, offset: int = 0) -> dict[str, Any]:
            tensor = grpcclient.InferInput(input_name, list(x.shape), "FP32")
            tensor.set_shared_memory(region, byte_size, offset)
            output = grpcclient.InferRequestedOutput(output_name)
            output.set_shared_memory("output_data", out_bytes)
            result = client.infer(args.model, [tensor], outputs=[output], client_timeout=TIMEOUT_S)
            meta = result.get_output(output_name)
            values = shm.get_contents_as_numpy(out_handle, np.float32, list(meta.shape))
            response = result.get_response()
            return {
                "shape": list(meta.shape),
                "datatype": meta.datatype,
                "raw_output_contents": [len(r) for r in response.raw_output_contents],
                "parameters": {k: str(v).strip() for k, v in meta.parameters.items()},
                output_name: values.tolist(),
            }

        run("infer", infer)
        run("infer_unknown_region", lambda: infer(region="no_such_region"))
        run("infer_out_of_bounds", lambda: infer(offset=8))
        run("unregister_input", lambda: client.unregister_system_shared_memory("input_data", client_timeout=TIMEOUT_S))
        run("status_after_unregister", status)
        run("infer_after_unregister", infer)
        run("unregister_all", lambda: client.unregister_system_shared_memory(client_timeout=TIMEOUT_S))
        run("status_at_end", status)
    finally:
        shm.destroy_shared_memory_region(in_handle)
        shm.destroy_shared_memory_region(out_handle)
        client.close()
    json.dump({"x": x.tolist(), "checks": checks}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Triton's own Python gRPC client against a secure maas gateway: TLS (``ssl=True`` and the mesh's CA) and an
API key in ``headers``; prints one JSON document.

Run as a standalone script (tritonclient's generated code cannot share a process with the project's stubs):

    python tests/contract/kserve_client/triton_tls.py --url 127.0.0.1:8001 --ca ca.pem --key maas_... \
        --model digits
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from sklearn.datasets import load_digits
from tritonclient.utils import InferenceServerException


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    client = grpcclient.InferenceServerClient(url=args.url, ssl=True, root_certificates=args.ca)
    headers = {"authorization": f"Bearer {args.key}"}
    result: dict[str, object] = {}
    try:
        client.is_server_live(client_timeout=10)
        result["anonymous"] = "OK"
    except InferenceServerException as exc:
        result["anonymous"] = exc.status()
    result["ready"] = client.is_server_ready(headers=headers, client_timeout=10)
    metadata = client.get_model_metadata(args.model, headers=headers, client_timeout=30)
    digits = load_digits()
    images = (np.asarray(digits.images[:16], dtype=np.float32) / 16.0).reshape(16, 1, 8, 8)
    tensor = grpcclient.InferInput(metadata.inputs[0].name, list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    response = client.infer(args.model, [tensor], headers=headers, client_timeout=30)
    scores = response.as_numpy(metadata.outputs[0].name)
    result["predicted"] = scores.argmax(axis=1).tolist()
    result["labels"] = digits.target[:16].tolist()
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

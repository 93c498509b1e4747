"""Baselines of the serving benchmark: raw in-process forward, a bare one-hop grpc.aio server, Ray Serve.

The bare server runs in its own process: ``python -m benchmarks.serving_baselines --serve-bare ADDR
--artifact PATH [--batcher]``. It answers ``inference.GRPCInferenceService/ModelInfer`` with the project's
generated stubs and nothing else: no interceptors, no validation beyond what decoding needs, no health. It
decodes the raw input with numpy, runs the forward with one torch thread and returns the raw output.
Without ``--batcher`` the forward runs per request on the event loop (the simplest server); with it,
requests that arrive while a forward runs are concatenated into the next one (up to 32, on one compute
thread), and a request that finds the model idle runs at once (no fixed wait).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

BARE_MAX_BATCH = 32
REPO = Path(__file__).resolve().parent.parent


# Raw in-process forward ---------------------------------------------------------------------------------------


def raw_forward(model: Any, make_input: Callable[[int], Any], batch: int, seconds: float, min_iters: int = 3) -> dict:
    """Times ``model(make_input(batch))`` in a loop (inference mode) for about ``seconds``.

    Returns samples/s and the median milliseconds per forward. The input is built once, outside the timing.
    """
    import torch

    x = make_input(batch)
    with torch.inference_mode():
        model(x)  # warm-up: first-call allocations
        times: list[float] = []
        started = time.perf_counter()
        while len(times) < min_iters or time.perf_counter() - started < seconds:
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    total = sum(times)
    return {
        "batch": batch,
        "forwards": len(times),
        "samples_per_s": round(batch * len(times) / total, 1),
        "ms_per_forward_p50": round(statistics.median(times) * 1000, 3),
    }


def raw_generate(model: Any, prompt: list[int], max_tokens: int, runs: int) -> dict:
    """In-process ``greedy_generate``: median time to first token and tokens/s over ``runs`` generations."""
    from shared.artifacts import greedy_generate

    ttft, rates, decode = [], [], []
    for _ in range(runs + 1):  # the first run warms up
        started = time.perf_counter()
        first = None
        count = 0
        for _token in greedy_generate(model, prompt, max_tokens):
            count += 1
            if first is None:
                first = time.perf_counter() - started
        total = time.perf_counter() - started
        assert first is not None
        ttft.append(first)
        rates.append(count / total)
        decode.append((count - 1) / (total - first) if count > 1 else 0.0)
    return {
        "runs": runs,
        "tokens": max_tokens,
        "ttft_ms_p50": round(statistics.median(ttft[1:]) * 1000, 3),
        "tokens_per_s": round(statistics.median(rates[1:]), 1),
        "decode_tokens_per_s": round(statistics.median(decode[1:]), 1),
    }


# The bare one-hop server (its own process) ---------------------------------------------------------------------


class _Batcher:
    """Concatenates the requests that queue up while a forward runs; never waits when the model is idle."""

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray]) -> None:
        self.forward = forward
        self.queue: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = []
        self.running = False
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="compute")
        self.batches = 0
        self.samples = 0

    async def infer(self, x: np.ndarray) -> np.ndarray:
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self.queue.append((x, future))
        if not self.running:
            self.running = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.queue:
                batch, self.queue = self.queue[:BARE_MAX_BATCH], self.queue[BARE_MAX_BATCH:]
                xs = np.concatenate([x for x, _ in batch]) if len(batch) > 1 else batch[0][0]
                try:
                    ys = await loop.run_in_executor(self.executor, self.forward, xs)
                except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                self.batches += 1
                self.samples += len(xs)
                offset = 0
                for x, future in batch:
                    n = len(x)
                    if not future.done():
                        future.set_result(ys[offset : offset + n])
                    offset += n
        finally:
            self.running = False


async def _serve_bare(address: str, artifact: Path, batcher: bool) -> None:
    import grpc
    import torch
    from inference import grpc_service_pb2 as pb
    from inference import grpc_service_pb2_grpc

    from shared.artifacts import datatype_to_numpy, load_artifact, read_manifest

    torch.set_num_threads(1)
    manifest = read_manifest(artifact)
    model = load_artifact(artifact)
    spec_in, spec_out = manifest.signature.inputs[0], manifest.signature.outputs[0]
    in_dtype = datatype_to_numpy(spec_in.datatype)

    def forward(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    batch_queue = _Batcher(forward) if batcher else None

    class Servicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
        async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
            tensor = request.inputs[0]
            # A copy: frombuffer over the request's bytes is read-only, which torch.from_numpy warns about.
            x = np.frombuffer(request.raw_input_contents[0], dtype=in_dtype).reshape(tuple(tensor.shape)).copy()
            y = await batch_queue.infer(x) if batch_queue is not None else forward(x)
            return pb.ModelInferResponse(
                model_name=request.model_name,
                model_version="1",
                id=request.id,
                outputs=[pb.ModelInferResponse.InferOutputTensor(name=spec_out.name, datatype="FP32", shape=y.shape)],
                raw_output_contents=[y.astype("<f4", copy=False).tobytes()],
            )

    server = grpc.aio.server()
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(), server)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"could not bind {address}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)
    if batch_queue is not None and batch_queue.batches:
        print(f"bare batcher: {batch_queue.samples} samples in {batch_queue.batches} batches", flush=True)


# Ray Serve ---------------------------------------------------------------------------------------------------------


class RayServeBaseline:
    """Ray Serve with ``@serve.batch`` serving the artifact, 1 replica, called through a ``DeploymentHandle``.

    Ray starts in this process (explicit ``num_cpus``, no dashboard) with the HTTP proxy disabled, since only
    the handle path is measured; :meth:`close` shuts Serve and Ray down.
    """

    def __init__(self, artifact: Path, num_cpus: int, max_batch: int, wait_s: float, max_ongoing: int) -> None:
        import ray
        from ray import serve

        # Replicas at normal priority, as maas runs its own (Ray's default niceness of 15 would handicap
        # the baseline against the load generator on the same cores).
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            namespace="bench-serving",
            # The replica imports shared.artifacts; workers start in a directory that may not be the repo.
            runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}},
        )
        serve.start(proxy_location="Disabled")

        @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=max_ongoing)
        class ServeModel:
            def __init__(self, path: str) -> None:
                import torch

                from shared.artifacts import load_artifact

                torch.set_num_threads(1)
                self.torch = torch
                self.model = load_artifact(Path(path))

            @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=wait_s)
            async def __call__(self, xs: list[np.ndarray]) -> list[np.ndarray]:
                with self.torch.inference_mode():
                    y = self.model(self.torch.from_numpy(np.concatenate(xs))).numpy()
                sizes = np.cumsum([len(x) for x in xs])[:-1]
                return list(np.split(y, sizes))

        app = ServeModel.bind(str(artifact))  # type: ignore[attr-defined]
        self.handle = serve.run(app, name="bench-serving", route_prefix=None)

    async def infer(self, x: np.ndarray) -> np.ndarray:
        return await self.handle.remote(x)

    def close(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve-bare", metavar="ADDRESS", required=True, help="Serve the bare server here.")
    parser.add_argument("--artifact", type=Path, required=True, help="The safetensors artifact to serve.")
    parser.add_argument("--batcher", action="store_true", help="Batch requests queued while a forward runs.")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    asyncio.run(_serve_bare(args.serve_bare, args.artifact, args.batcher))


if __name__ == "__main__":
    main()

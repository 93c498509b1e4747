"""How much slower the serving benchmark's MLP forward runs right after the thread was idle or its caches
were flushed (one of the limits of latency at concurrency 1 on this VM): ``python -m benchmarks.wakeup``.

Prints the median time of the same ``[1, 784]`` forward (1 torch thread) warm, after touching 8 MiB of
other memory, and after sleeping 2 ms: a request at concurrency 1 meets the last case in every process
and thread it crosses.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from shared.artifacts import Manifest, build_model


def main() -> None:
    torch.set_num_threads(1)
    model = build_model(Manifest.for_model("mlp", {"in_features": 784, "hidden": [512, 512], "out_features": 10}))
    model.eval()
    x = torch.from_numpy(np.random.default_rng(0).random((1, 784), dtype=np.float32))
    other = np.ones(1024 * 1024)  # 8 MiB

    def forward() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            model(x)
        return (time.perf_counter() - started) * 1e6

    for _ in range(200):
        forward()
    warm = statistics.median(forward() for _ in range(1000))
    flushed = []
    for _ in range(300):
        other += 1.0
        flushed.append(forward())
    idle = []
    for _ in range(300):
        time.sleep(0.002)
        idle.append(forward())
    print(
        f"forward warm {warm:.0f} us, after touching 8 MiB {statistics.median(flushed):.0f} us, "
        f"after 2 ms idle {statistics.median(idle):.0f} us"
    )


if __name__ == "__main__":
    main()

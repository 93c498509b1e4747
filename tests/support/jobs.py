"""Training jobs small enough for integration tests on 2 cores: the digits MLP, 1 worker and 1 shard, 1 epoch
(its steps take milliseconds: what takes time is placing the gang)."""

from __future__ import annotations

import json
from typing import Any

from maas.scheduler.v1 import scheduler_pb2 as spb

TINY_MLP = {"in_features": 64, "hidden": [16], "out_features": 10}


def tiny_job_spec(target_model: str, **changes: Any) -> spb.TrainingJobSpec:
    """The tiny job training ``target_model``, with ``changes`` to any spec field."""
    fields: dict[str, Any] = {
        "architecture": "mlp",
        "arguments_json": json.dumps(TINY_MLP),
        "dataset": spb.DatasetSpec(name="digits"),
        "optimizer": {"name": "sgd", "hyperparameters": {"lr": 0.1}},
        "batch_size": 64,
        "epochs": 1,
        "workers": 1,
        "shards": 1,
        "consistency": "bsp",
        "target_model": target_model,
        "seed": 7,
    }
    return spb.TrainingJobSpec(**{**fields, **changes})

"""Server-side optimizers and learning-rate schedules on flat tensors.

Shared because the parameter server runs them and the scheduler validates a job's optimizer at submit
time with the same code.
"""

from shared.optim.optimizers import Optimizer, OptimizerState, make_optimizer, optimizer_from_config
from shared.optim.schedules import Constant, Cosine, Schedule, StepDecay, Warmup, make_schedule, schedule_from_config

__all__ = [
    "Constant",
    "Cosine",
    "Optimizer",
    "OptimizerState",
    "Schedule",
    "StepDecay",
    "Warmup",
    "make_optimizer",
    "make_schedule",
    "optimizer_from_config",
    "schedule_from_config",
]

"""The one place that decides what the model runs next, above every backend."""

from consumer.engine.scheduler.policy import (
    PRIORITIES,
    Load,
    Plan,
    Policy,
    Priority,
    QueueFull,
    Work,
)

__all__ = ["PRIORITIES", "Load", "Plan", "Policy", "Priority", "QueueFull", "Work"]

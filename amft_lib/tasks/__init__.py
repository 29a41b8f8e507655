"""Task registry: a dataset row's `task` column names the verifier that judges it.

Adding a task means one module implementing `Task` (see base.py) and one entry in `_REGISTRY`.
"""

from __future__ import annotations

from collections.abc import Callable

from amft_lib.tasks.base import Task, Verdict
from amft_lib.tasks.countdown import CountdownTask
from amft_lib.tasks.general_points import GeneralPointsTask
from amft_lib.tasks.math import MathTask

_REGISTRY: dict[str, Callable[[], Task]] = {
    GeneralPointsTask.name: GeneralPointsTask,
    CountdownTask.name: CountdownTask,
    MathTask.name: MathTask,
}


def known_tasks() -> tuple[str, ...]:
    """The registered task names, sorted."""
    return tuple(sorted(_REGISTRY))


def get_task(name: str) -> Task:
    """A fresh task instance with default settings; ValueError (listing the known names) otherwise."""
    try:
        factory = _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(known_tasks())}") from None
    return factory()


__all__ = ["CountdownTask", "GeneralPointsTask", "MathTask", "Task", "Verdict", "get_task", "known_tasks"]

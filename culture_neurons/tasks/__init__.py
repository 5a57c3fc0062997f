"""What a run's items are and how they are scored: one module per task, one registry.

A task (:class:`~culture_neurons.tasks.base.Task`) says how items become a batch, how the full
model scores them, how a group of items is scored under many ablation sets (the matrix's
scores), what the first-order estimate differentiates, how the scores become
``eval/<method>.json`` (with the measures of :mod:`culture_neurons.eval_schema`), which report
section it writes and which items identification records by default. Nothing outside these
modules asks which task a run has: it asks the run's task.

- :mod:`.mc` (``mc``): multiple-choice questions about images, scored by their letter.
- :mod:`.lm` (``lm``): plain sentences, scored by their next-token NLL.

Adding a task = adding one module and one line of :data:`TASKS`.
"""

from __future__ import annotations

from culture_neurons.errors import UsageError
from culture_neurons.tasks.base import Task
from culture_neurons.tasks.lm import LMTask
from culture_neurons.tasks.mc import MCTask

TASKS: dict[str, type] = {MCTask.name: MCTask, LMTask.name: LMTask}
DEFAULT = MCTask.name  # a run (or an eval JSON) that names no task


def task_class(name: str | None) -> type:
    """The task called ``name`` (None: the default).

    Raises:
        UsageError: no such task.
    """
    name = DEFAULT if name is None else name
    if name not in TASKS:
        raise UsageError(f"--task must be one of {', '.join(TASKS)}, got {name!r}")
    return TASKS[name]


__all__ = ["DEFAULT", "TASKS", "LMTask", "MCTask", "Task", "task_class"]

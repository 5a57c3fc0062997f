"""The run's tasks, under their former home: they live in :mod:`culture_neurons.tasks` (one
module per task and a registry); these names stay importable from here."""

from culture_neurons.tasks import TASKS, LMTask, MCTask
from culture_neurons.tasks.assemble import DIRECTIONS

__all__ = ["DIRECTIONS", "TASKS", "LMTask", "MCTask"]

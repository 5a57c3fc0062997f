"""The experiment as steps: :class:`RunConfig` (:mod:`.config`), :class:`Run` (:mod:`.run`) and
its tasks (:mod:`.tasks`), splitting work over processes (:mod:`.distributed`), and the
``culture-neurons`` command (:mod:`.cli`)."""

from culture_neurons.pipeline.config import RunConfig
from culture_neurons.pipeline.run import Run

__all__ = ["Run", "RunConfig"]

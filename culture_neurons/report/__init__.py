"""The report of a run (SPEC "What a run leaves behind"): ``OUT/report.md`` and ``OUT/figures/``.

One writer per task (the task's ``write_report`` picks it, :mod:`culture_neurons.tasks`) over
shared parts: :mod:`.mc` (multiple choice: accuracy, delta and flip matrices, figures) and
:mod:`.lm` (language modelling: NLL matrices), both reading the run's files (:mod:`.files`) and
writing with the same tables (:mod:`.tables`), figures (:mod:`.figures`) and layer summaries
(:mod:`.layers`). Reports need only the files, never the model, so they can be written again
for any finished run.
"""

from __future__ import annotations

import os
from pathlib import Path

from culture_neurons.report.files import load_run


def write_report(out_dir: str | os.PathLike, description: str = "") -> Path:
    """``OUT/report.md`` (and, for multiple choice, ``OUT/figures/*.png``) of the run in
    ``out_dir``, by the writer of its task; returns the report's path."""
    from culture_neurons.tasks import task_class

    run = load_run(out_dir)
    task = run.config.get("task") or next(iter(run.evals.values())).get("task")
    return task_class(task).write_report(out_dir, description=description)


__all__ = ["write_report"]

"""The task registry (culture_neurons.tasks): each task is one module, and no other module of
the package asks which task a run has (issue #27: adding a task = one module + one line)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from culture_neurons.errors import UsageError
from culture_neurons.pipeline.config import TASKS as CONFIG_TASKS
from culture_neurons.pipeline.config import RunConfig, identify_on_for
from culture_neurons.tasks import DEFAULT, TASKS, task_class

PACKAGE = Path(__file__).resolve().parents[2] / "culture_neurons"


def test_task_names_appear_only_in_their_own_modules():
    """A quoted task name (``"lm"``) anywhere else would be a branch on the task."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if "demo" in path.parts:  # the toy names its data's task, not a branch (another issue)
            continue
        text = path.read_text(encoding="utf-8")
        for name in TASKS:
            for m in re.finditer(rf"""["']{name}["']""", text):
                line = text[: m.start()].count("\n") + 1
                found.append((path.relative_to(PACKAGE).as_posix(), line, name))
    allowed = {(f"tasks/{name}.py", name) for name in TASKS}
    assert [f for f in found if (f[0], f[2]) not in allowed] == []


def test_the_registry_is_the_one_list_of_tasks():
    assert CONFIG_TASKS == tuple(TASKS) and task_class(None) is TASKS[DEFAULT]
    assert all(task_class(name).name == name for name in TASKS)
    with pytest.raises(UsageError, match="--task must be one of"):
        task_class("qa")


@pytest.mark.parametrize("name", list(TASKS))
def test_identify_on_defaults_come_from_the_task(name):
    task = TASKS[name]
    fixed = task.fixed_identify_on
    if fixed is None:  # answers exist: the correct ones by default where labels say which
        assert identify_on_for(None, True, name) == "correct"
        assert identify_on_for(None, False, name) == "all"
        with pytest.raises(UsageError, match="labels"):
            identify_on_for("correct", False, name)
    else:  # one choice only; RunConfig's default "correct" becomes it, a given one is refused
        assert identify_on_for(None, True, name) == fixed
        assert RunConfig(task=name).identify_on == fixed
        with pytest.raises(UsageError, match="does not apply"):
            identify_on_for("correct", True, name)

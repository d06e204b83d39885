"""Task names follow one rule, and the display's stage tables name real tasks."""

from __future__ import annotations

import importlib
import pkgutil

from prefect import Task

import tasks
from flows import stages


def _all_tasks() -> list[Task[..., object]]:
    found: dict[int, Task[..., object]] = {}
    for info in pkgutil.walk_packages(tasks.__path__, "tasks."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if isinstance(value, Task):
                found[id(value)] = value
    return list(found.values())


def test_every_task_is_named_by_its_function_and_its_runs_by_it_too() -> None:
    found = _all_tasks()
    assert len(found) > 40, "found too few tasks: has the layout moved?"
    for task in found:
        function = task.fn.__name__
        assert task.name == function, f"{function} runs as {task.name!r}"
        run_name = task.task_run_name
        if isinstance(run_name, str):
            assert run_name.startswith(f"{function}-{{"), f"{function}: run name {run_name!r}"


def test_the_stage_tables_name_only_real_tasks() -> None:
    names = {task.name for task in _all_tasks()}
    tables = [
        stages.CI_STAGES,
        stages.CI_STEPS,
        stages.PROMOTE_STAGES,
        stages.PROMOTE_STEPS,
        stages.ROLLBACK_STAGES,
        stages.ROLLBACK_STEPS,
    ]
    for table in tables:
        assert table, "an empty stage table"
        assert set(table) <= names, set(table) - names
    assert stages.ROLLBACK_STAGES["restore_service"] == "rollback"
    assert stages.CI_STAGES["run_pytest"] == "pytest"

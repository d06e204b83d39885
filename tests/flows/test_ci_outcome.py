"""A CI run whose services failed: Failed with one line, its CiOutcome kept, no traceback.

The flows here end the way `ci` ends (`ci_failed`, the same function) and run the way a
worker runs a flow: `prefect.flow_engine.run_flow` with the flow-run logger as its error
logger (`python -m prefect.engine`). The whole `ci` flow on a real worker is in
tests/stack/test_worker.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from prefect import flow
from prefect.client.schemas.objects import State
from prefect.flow_engine import run_flow
from prefect.states import Completed, Failed

from core.errors import CiFailed
from core.records import CiOutcome, StageResult
from flows.ci import FLOW_RUN_LOGGER, ci_failed, ci_outcome, notify_ci_failed

RUFF = StageResult(service="auth", stage="ruff", status="failed", summary="1 lint\nfindings")
PYTEST = StageResult(service="course", stage="pytest", status="failed", summary="1 failed")
PASSED = StageResult(service="content", stage="pytest", status="passed")
LINE = (
    "CI failed for 2 of 3 services: auth: ruff failed: 1 lint findings; "
    "course: pytest failed: 1 failed"
)


def _outcome(*, protected: bool = False) -> CiOutcome:
    return CiOutcome(
        commit="c" * 40,
        protected=protected,
        affected=["auth", "course", "content"],
        results=[RUFF, PYTEST, PASSED],
        failed={"auth": "ruff: 1 lint findings", "course": "pytest: 1 failed"},
    )


@flow(name="ci-ends-failed", on_failure=[notify_ci_failed])
def ends_failed(protected: bool = False) -> State[Any]:
    return ci_failed(_outcome(protected=protected), {"auth": RUFF, "course": PYTEST})


@flow(name="ci-returns-outcome-as-data")
def outcome_as_data() -> State[Any]:
    """How `ci` ended before: the outcome itself as a failed state's data."""
    return Failed(message=LINE, data=_outcome())


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self) -> str:
        lines = []
        for record in self.records:
            lines.append(record.getMessage())
            if record.exc_info:
                lines.append(logging.Formatter().formatException(record.exc_info))
        return "\n".join(lines)


@pytest.fixture
def run_logs() -> Iterator[_Kept]:
    """What the flow-run logger (the error logger of a worker's engine) and notify log."""
    kept = _Kept()
    loggers = [logging.getLogger(FLOW_RUN_LOGGER), logging.getLogger("prefect.task_runs")]
    for logger in loggers:
        logger.addHandler(kept)
    yield kept
    for logger in loggers:
        logger.removeHandler(kept)


def test_a_failed_run_ends_with_one_line_and_keeps_its_outcome() -> None:
    state = ends_failed(return_state=True)
    assert state.is_failed()
    assert state.message == LINE
    assert ci_outcome(state) == _outcome()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, CiFailed)
    assert str(error) == LINE
    with pytest.raises(CiFailed) as raised:  # called plainly, the run's error is raised
        ends_failed()
    assert raised.value.outcome == _outcome()


def test_run_as_a_worker_runs_it_the_engine_logs_no_traceback(run_logs: _Kept) -> None:
    with pytest.raises(CiFailed):  # the engine re-raises; `python -m prefect.engine` exits 0
        run_flow(ends_failed, error_logger=logging.getLogger(FLOW_RUN_LOGGER))
    text = run_logs.text()
    assert f"Finished in state Failed({LINE!r})" in text, text
    for crash in ("unexpected exception", "Traceback", "TypeError"):
        assert crash not in text, text


def test_the_outcome_as_a_failed_states_data_was_a_crash_on_a_worker(run_logs: _Kept) -> None:
    """What the issue saw, so the test above can fail: TypeError, logged as a crash."""
    with pytest.raises(TypeError, match="Unexpected result for failed state"):
        run_flow(outcome_as_data, error_logger=logging.getLogger(FLOW_RUN_LOGGER))
    assert "Engine execution exited with unexpected exception" in run_logs.text()


def test_ci_outcome_of_other_ends() -> None:
    assert ci_outcome(Completed(data=_outcome())) == _outcome()
    assert ci_outcome(Failed(message="no repository")) is None  # failed before checking
    assert ci_outcome(Completed()) is None  # read back from the API: no result there


def test_the_failure_hook_reads_the_outcome(run_logs: _Kept) -> None:
    """Only a protected commit's failure is Slack's (no Slack block is saved: not sent)."""
    ends_failed(protected=False, return_state=True)
    assert "failed notice not sent" not in run_logs.text()
    ends_failed(protected=True, return_state=True)
    assert "failed notice not sent" in run_logs.text()

"""Reading what deployment runs said, through the Prefect API."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import TaskRun


def wait_for_log(run_id: UUID, text: str, timeout_s: float = 30) -> bool:
    """True once a log line of the run contains `text` (logs arrive in batches)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))
            )
        if any(text in log.message for log in logs):
            return True
        time.sleep(1)
    return False


def task_runs_of(
    run_ids: Iterable[UUID],
    ready: Callable[[list[TaskRun]], bool] = bool,
    timeout_s: float = 60,
) -> list[TaskRun]:
    """The task runs of the flow runs, once `ready` holds of them (else, after `timeout_s`,
    what was there). Task runs reach the server as events, handled after the flow run's
    own final state: read at once, the list of a finished run can still be partial (seen
    on three busy workers: none of a finished CI run's push_image runs yet)."""
    ids = list(run_ids)
    end = time.monotonic() + timeout_s
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids))
            )
        if ready(runs) or time.monotonic() > end:
            return runs
        time.sleep(0.5)


def finished(name: str) -> Callable[[list[TaskRun]], bool]:
    """`ready` for `task_runs_of`: a run of task `name` is there, and every run of it has
    reached a final state (a retried run is final only after its last attempt). Other
    tasks' runs are not waited for: a failed flow leaves some never started."""

    def ready(runs: list[TaskRun]) -> bool:
        mine = [r for r in runs if r.name.startswith(f"{name}-")]
        return bool(mine) and all(r.state is not None and r.state.is_final() for r in mine)

    return ready


def failures_of(run_id: UUID) -> list[str]:
    """`task run: state message` of every task run of the flow run that did not complete."""
    runs = task_runs_of([run_id], timeout_s=10)
    return [
        f"{r.name}: {r.state.message}"
        for r in runs
        if r.state is not None and not r.state.is_completed()
    ]

"""Reading what deployment runs said, through the Prefect API."""

from __future__ import annotations

import time
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId


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


def failures_of(run_id: UUID) -> list[str]:
    """`task run: state message` of every task run of the flow run that did not complete."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId  # noqa: PLC0415

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )
    return [
        f"{r.name}: {r.state.message}"
        for r in runs
        if r.state is not None and not r.state.is_completed()
    ]

"""Prefect deployments as workers' queues: start one run per service, collect what they found.

The parent CI run creates every child run through the server at once (`run_deployment`
with `timeout=0`, linked as subflows), so whichever workers of the pool are free take
them; it then waits for all of them. A child that crashed, was cancelled or whose
worker vanished is reported as a failed `worker` stage of its service, never dropped.
"""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.deployments import run_deployment

from core.records import StageResult
from tasks.process import run_logger

SERVICE_DEPLOYMENT = "ci-service/ci-service"
FINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED}
POLL_S = 2.0


@task(cache_policy=NO_CACHE)
def start_service_runs(
    deployment: str, services: list[str], parameters: dict[str, Any]
) -> dict[str, UUID]:
    """One run of `deployment` per service, created now and left to the pool's workers."""
    runs = {}
    for service in services:
        run: FlowRun = run_deployment(  # type: ignore[assignment]  # sync here: no event loop
            deployment,
            parameters={**parameters, "service": service},
            timeout=0,
            as_subflow=True,
            flow_run_name=f"ci-service-{service}",
        )
        runs[service] = run.id
    run_logger().info("started %d service runs of %s", len(runs), deployment)
    return runs


def _lost(service: str, why: str) -> StageResult:
    return StageResult(service=service, stage="worker", status="failed", summary=why)


@task(cache_policy=NO_CACHE)
def collect_service_runs(runs: dict[str, UUID], timeout_s: float = 3600) -> list[StageResult]:
    """Wait for every service run; the stage results each reported, in service order.

    A run that did not complete with results stands as a failed `worker` stage naming
    its final state, so no service's branch is ever lost silently.
    """
    pending = dict(runs)
    states: dict[str, Any] = {}
    end = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while pending and time.monotonic() < end:
            for service, run_id in list(pending.items()):
                state = client.read_flow_run(run_id).state
                if state is not None and state.type in FINAL:
                    states[service] = state
                    del pending[service]
            if pending:
                time.sleep(POLL_S)
    results: list[StageResult] = []
    for service, run_id in runs.items():
        if service in pending:
            results.append(_lost(service, f"no result after {timeout_s:.0f}s (run {run_id})"))
            continue
        state = states[service]
        value = state.result(raise_on_failure=False)
        if isinstance(value, list) and all(isinstance(r, StageResult) for r in value):
            results.extend(value)
        else:
            why = f"its run ended {state.type.value}: {state.message or 'no message'}"
            results.append(_lost(service, why))
    run_logger().info("collected %d service runs", len(runs))
    return results

"""Prefect deployments as workers' queues: start one run per service, collect what they found.

The parent CI run creates every child run through the server at once (`run_deployment`
with `timeout=0`, linked as subflows), so whichever workers of the pool are free take
them; it then waits for all of them. A child that crashed, was cancelled or whose
worker vanished is reported as a failed `worker` stage of its service, never dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.deployments import run_deployment
from prefect.exceptions import PrefectHTTPStatusError

from core.records import StageResult
from tasks.process import run_logger

SERVICE_DEPLOYMENT = "ci-service/ci-service"
FINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED}
POLL_S = 2.0
OUTAGE_BUDGET_S = 300.0
"""How long the Prefect API may be unavailable while CI waits for its service runs."""


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


@dataclass
class _Outage:
    since: float
    error: Exception
    warned: bool = False


def _lost(service: str, why: str) -> StageResult:
    return StageResult(service=service, stage="worker", status="failed", summary=why)


@task(cache_policy=NO_CACHE)
def collect_service_runs(runs: dict[str, UUID], timeout_s: float = 3600) -> list[StageResult]:
    """Wait for every service run; the stage results each reported, in service order.

    A run that did not complete with results stands as a failed `worker` stage naming
    its final state, so no service's branch is ever lost silently. The Prefect API may
    be unavailable for up to `OUTAGE_BUDGET_S` at a time (a restart, a blip): the wait
    goes on; past that, the pending runs are reported lost with the error.
    """
    pending = dict(runs)
    states: dict[str, Any] = {}
    end = time.monotonic() + timeout_s
    outage: _Outage | None = None
    with get_client(sync_client=True) as client:
        while pending and time.monotonic() < end:
            try:
                for service, run_id in list(pending.items()):
                    state = client.read_flow_run(run_id).state
                    if state is not None and state.type in FINAL:
                        states[service] = state
                        del pending[service]
            except (httpx.HTTPError, PrefectHTTPStatusError) as exc:
                if isinstance(exc, PrefectHTTPStatusError) and exc.response.status_code < 500:
                    raise
                outage = outage or _Outage(time.monotonic(), exc)
                if time.monotonic() - outage.since > OUTAGE_BUDGET_S:
                    end = 0.0  # give up: every pending run is reported lost, with why
                    break
                if outage.warned is False:
                    run_logger().warning("Prefect API unavailable, still waiting: %s", exc)
                    outage.warned = True
            else:
                if outage is not None:
                    run_logger().info(
                        "Prefect API back after %.0fs", time.monotonic() - outage.since
                    )
                outage = None
            if pending:
                time.sleep(POLL_S)
    results: list[StageResult] = []
    for service, run_id in runs.items():
        if service in pending:
            why = (
                f"the Prefect API was unavailable for {OUTAGE_BUDGET_S:.0f}s "
                f"({type(outage.error).__name__}: {outage.error}); run {run_id}"
                if outage is not None and end == 0.0
                else f"no result after {timeout_s:.0f}s (run {run_id})"
            )
            results.append(_lost(service, why))
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

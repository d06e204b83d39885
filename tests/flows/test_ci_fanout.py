"""Scale-out: two real workers on a PostgreSQL-backed Prefect server share one CI run.

The `ci` flow with `fan_out` starts one `ci-service` deployment run per service; each
worker (a process worker of its own, one run at a time) takes some of them. The parent's
summary must equal the one of the same commit checked in one process.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
    FlowRunFilterStartTime,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import StateType
from prefect.settings import PREFECT_API_URL, temporary_settings

from blocks.stack import StackInfo
from core.records import CiOutcome
from flows.ci import ci, ci_outcome
from reconcile.setup import VANISHED_AFTER_S, ensure_setup
from stack.worker import ensure_worker, stop_worker
from tests.plugins.postgres import PostgresPrefect
from tests.tasks.ci_checkout import copy_monorepo, git
from tests.trust import pin_repository

pytestmark = pytest.mark.slow  # two process workers on a PostgreSQL-backed server: minutes

SERVICES = ["auth", "course", "content"]  # catalog order


@pytest.fixture(scope="module")
def two_workers(
    postgres_prefect: PostgresPrefect, tmp_path_factory: pytest.TempPathFactory, stack: StackInfo
) -> Iterator[tuple[str, dict[int, str]]]:
    """Deployments and two one-run-at-a-time workers on the PostgreSQL-backed server."""
    root = tmp_path_factory.mktemp("fanout")
    work = copy_monorepo(root / "work", SERVICES, pipeline=True)
    bare = root / "remote.git"
    git(root, "init", "-q", "--bare", "-b", "main", str(bare))
    git(work, "remote", "add", "origin", str(bare))
    git(work, "push", "-q", "origin", "main")
    sha = git(work, "rev-parse", "HEAD").strip()
    api = postgres_prefect.api_url
    mp = pytest.MonkeyPatch()
    pin_repository(mp, root, bare)  # this process's runs (the parent `ci`) pin it too
    with temporary_settings(updates={PREFECT_API_URL: api}):
        ensure_setup(api)
        pids = {
            ensure_worker(
                root / name, api, limit=1, repository=str(bare), repository_name="elice/monorepo"
            ): name
            for name in ("worker-a", "worker-b")
        }
        try:
            yield sha, pids
        finally:
            for name in ("worker-a", "worker-b"):
                stop_worker(root / name)
            mp.undo()


def _statuses(outcome: CiOutcome) -> dict[tuple[str, str], str]:
    return {(r.service, r.stage): r.status for r in outcome.results}


def _children(parent: Any) -> list[Any]:
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])
            )
        )
    return [r for r in runs if r.name.startswith("ci-service-")]


def _worker_of(run_id: Any, pids: dict[int, str]) -> str:
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    for log in logs:
        found = re.search(r"worker pid (\d+)", log.message)
        if found and int(found.group(1)) in pids:
            return pids[int(found.group(1))]
    return "unknown"


def test_two_workers_share_the_service_branches_of_one_run(
    two_workers: tuple[str, dict[int, str]], postgres_prefect: PostgresPrefect
) -> None:
    sha, pids = two_workers
    with temporary_settings(updates={PREFECT_API_URL: postgres_prefect.api_url}):
        fanned = ci(services=SERVICES, head=sha, fan_out=True, no_cache=True, return_state=True)
        local = ci(services=SERVICES, head=sha, no_cache=True, return_state=True)
        assert fanned.is_completed(), fanned.message
        assert local.is_completed(), local.message
        spread, alone = ci_outcome(fanned), ci_outcome(local)
        assert spread is not None
        assert alone is not None
        assert _statuses(spread) == _statuses(alone)
        assert spread.message == alone.message
        assert spread.commit == alone.commit == sha
        children = _children(fanned.state_details.flow_run_id)
        assert sorted(c.name for c in children) == sorted(f"ci-service-{s}" for s in SERVICES)
        workers = {_worker_of(c.id, pids) for c in children}
    assert workers == {"worker-a", "worker-b"}


def _descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(parent)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        children = [int(p) for p in out.split()]
        found += children
        frontier += children
    return found


def test_a_worker_that_vanishes_mid_run_has_its_branch_reported(
    two_workers: tuple[str, dict[int, str]], postgres_prefect: PostgresPrefect
) -> None:
    """Worker a and the flow run it executes are SIGKILLed together, as a lost machine
    would be: no hook reports it. `cicd setup`'s automation marks that run Crashed once
    its heartbeats stop, and the parent reports the branch as a failed `worker` stage."""
    sha, pids = two_workers
    victim = next(pid for pid, name in pids.items() if name == "worker-a")
    states: queue.Queue[Any] = queue.Queue()
    with temporary_settings(updates={PREFECT_API_URL: postgres_prefect.api_url}):
        started = time.monotonic()
        context = contextvars.copy_context()  # the thread talks to this server too
        thread = threading.Thread(
            target=lambda: states.put(
                context.run(
                    ci, services=SERVICES, head=sha, fan_out=True, no_cache=True, return_state=True
                )
            ),
            daemon=True,
        )
        thread.start()
        lost = None
        while lost is None and time.monotonic() - started < 300:
            for parent in _parents_since(started):
                for child in _children(parent):
                    running = child.state is not None and child.state.is_running()
                    if running and _worker_of(child.id, pids) == "worker-a":
                        lost = child
            time.sleep(0.5)
        assert lost is not None, "worker a never ran a service branch"
        for pid in [victim, *_descendants(victim)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        state = states.get(timeout=600)
        noticed_s = time.monotonic() - killed
        service = lost.name.removeprefix("ci-service-")
        outcome = ci_outcome(state)
        assert state.is_failed(), state.message
        assert outcome is not None, state.message
        with get_client(sync_client=True) as client:
            final = client.read_flow_run(lost.id).state
    assert final is not None
    assert final.type == StateType.CRASHED
    assert "no heartbeat" in (final.message or "")
    worker_stage = [r for r in outcome.results if r.service == service and r.stage == "worker"]
    assert len(worker_stage) == 1, outcome.results
    assert worker_stage[0].status == "failed"
    assert "CRASHED" in worker_stage[0].summary
    # the other branches ran to the end on worker b
    others = {r.service for r in outcome.results if r.service != service}
    assert others == set(SERVICES) - {service}
    assert noticed_s < 4 * VANISHED_AFTER_S, f"noticed after {noticed_s:.0f}s"


def _parents_since(started: float) -> list[Any]:
    since = datetime.now(UTC) - timedelta(seconds=time.monotonic() - started + 5)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["ci"])),
            flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since)),
        )
    return [r.id for r in runs]

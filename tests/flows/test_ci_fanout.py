"""Scale-out: two real workers on a PostgreSQL-backed Prefect server share one CI run.

The `ci` flow with `fan_out` starts one `ci-service` deployment run per service; each
worker (a process worker of its own, one run at a time) takes some of them. The parent's
summary must equal the one of the same commit checked in one process.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.settings import PREFECT_API_URL, temporary_settings

from blocks.repository import REPOSITORY_BLOCK, GitRepository
from blocks.stack import StackInfo
from cicd.setup import ensure_setup
from cicd.worker import ensure_worker, stop_worker
from flows.ci import CiOutcome, ci
from tests.plugins.postgres import PostgresPrefect
from tests.tasks.ci_checkout import copy_monorepo, git

SERVICES = ["auth", "course", "content"]  # catalog order


@pytest.fixture(scope="module")
def two_workers(
    postgres_prefect: PostgresPrefect, tmp_path_factory: pytest.TempPathFactory, stack: StackInfo
) -> Iterator[tuple[str, dict[int, str]]]:
    """Deployments and two one-run-at-a-time workers on the PostgreSQL-backed server."""
    root = tmp_path_factory.mktemp("fanout")
    work = copy_monorepo(root / "work", SERVICES)
    bare = root / "remote.git"
    git(root, "init", "-q", "--bare", "-b", "main", str(bare))
    git(work, "remote", "add", "origin", str(bare))
    git(work, "push", "-q", "origin", "main")
    sha = git(work, "rev-parse", "HEAD").strip()
    api = postgres_prefect.api_url
    with temporary_settings(updates={PREFECT_API_URL: api}):
        ensure_setup(api)
        GitRepository(url=str(bare), name="elice/monorepo").save(REPOSITORY_BLOCK, overwrite=True)
        pids = {ensure_worker(root / name, api, limit=1): name for name in ("worker-a", "worker-b")}
        try:
            yield sha, pids
        finally:
            for name in ("worker-a", "worker-b"):
                stop_worker(root / name)


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
        spread, alone = fanned.result(), local.result()
        assert isinstance(spread, CiOutcome)
        assert isinstance(alone, CiOutcome)
        assert _statuses(spread) == _statuses(alone)
        assert spread.message == alone.message
        assert spread.commit == alone.commit == sha
        children = _children(fanned.state_details.flow_run_id)
        assert sorted(c.name for c in children) == sorted(f"ci-service-{s}" for s in SERVICES)
        workers = {_worker_of(c.id, pids) for c in children}
    assert workers == {"worker-a", "worker-b"}

"""Faults of the machinery itself: a promotion whose process dies between two deploys.

The promotion runs as its own process against a full `prefect server start` (on
PostgreSQL: expired lock leases are revoked by the server's repossessor, which the
session's ephemeral server does not run), and is killed with SIGKILL after its first
service moved: no hook runs, no lock is released, the flow run stays "Running". What
must hold: the ledger says a promotion was under way and from what; the health check
says so in one line; the next promotion finds the dead one within one lock lease, puts
the previous releases back, marks the dead run Crashed, and then does its own work.
Own environments (fx-dev -> fx-stg, host ports 46xxx/47xxx) and two services.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import docker
import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.settings import PREFECT_API_URL, temporary_settings

from blocks.config import PipelineConfig, load_config
from blocks.stack import StackInfo
from core.errors import EnvironmentUnhealthy
from core.records import ImageRef
from core.trust import TRUST_FILE_ENV
from flows.health import health_check
from tasks.approval import read_gate, submit_answer
from tasks.deploy.docker import DockerDeployer
from tasks.health import probe_health
from tasks.locks import LEASE_S
from tests.approvers import Approvers
from tests.flows.chain import (
    SERVICES,
    derive,
    protected_tip,
    put_verified,
    remove_containers,
    write_chain_config,
)
from tests.ledgers import current_ledger
from tests.plugins.postgres import PostgresPrefect
from tests.trust import trust_file_for

pytestmark = pytest.mark.stack

DEV, STG, PROD = "fx-dev", "fx-stg", "fx-prod"

PROMOTE = textwrap.dedent(
    """
    import json, sys
    from flows.promotion import promote

    signed = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {"promoted_by": "ci"}
    state = promote(
        environment=sys.argv[1],
        config_source=sys.argv[2],
        health_deadline_s=30,
        return_state=True,
        **signed,
    )
    print("FINAL", state.type.value, state.message, flush=True)
    """
)


def serving(cfg: PipelineConfig, env: str) -> dict[str, str | None]:
    deployer = DockerDeployer()
    spec = cfg.environment(env)
    out: dict[str, str | None] = {}
    for name in SERVICES:
        svc = cfg.service(name)
        address = deployer.address(spec, svc)
        ok = probe_health(address, svc, deadline_s=5).ok
        out[name] = httpx.get(f"{address}/version", timeout=10).json()["digest"] if ok else None
    return out


def live_digest(cfg: PipelineConfig, env: str, service: str) -> str | None:
    live = DockerDeployer().live(cfg.environment(env), cfg.service(service))
    return live.image.digest if live else None


@pytest.fixture
def releases(
    tmp_path: Path,
    stack: StackInfo,
    docker_client: docker.DockerClient,
    pushed_image: ImageRef,
) -> Iterator[tuple[PipelineConfig, str, ImageRef, ImageRef]]:
    """fx-stg serves D1 of both services; fx-dev holds a verified D2 of both."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DOCKER_HOST", stack.docker_host)
    cfg_path = write_chain_config(
        tmp_path / "pipeline.yaml", [(DEV, 38100), (STG, 39100), (PROD, 39600)]
    )
    cfg = load_config(cfg_path)
    remove_containers(docker_client, [DEV, STG, PROD])
    d1 = pushed_image
    d2 = derive(docker_client, pushed_image, "fault")
    for service in SERVICES:
        put_verified(cfg, STG, service, d1)
        put_verified(cfg, DEV, service, d2)
    yield cfg, cfg_path, d1, d2
    remove_containers(docker_client, [DEV, STG, PROD])
    mp.undo()


def _wait(probe: object, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not probe():  # type: ignore[operator]
        if time.monotonic() > end:
            pytest.fail(f"{what}: not within {timeout:.0f}s")
        time.sleep(0.1)


def test_a_promotion_killed_between_deploys_is_undone_by_the_next_run(
    releases: tuple[PipelineConfig, str, ImageRef, ImageRef],
    postgres_prefect: PostgresPrefect,
    stack: StackInfo,
    tmp_path: Path,
) -> None:
    cfg, cfg_path, d1, d2 = releases
    env = {
        **os.environ,
        "PREFECT_API_URL": postgres_prefect.api_url,
        "DOCKER_HOST": stack.docker_host,
    }
    before = current_ledger().current(STG)
    with (tmp_path / "first.log").open("w") as log:
        first = subprocess.Popen(
            [sys.executable, "-c", PROMOTE, STG, cfg_path],
            # one service after another: in waves both may finish before the kill, and
            # the moment between two deploys is what this test kills in
            env={**env, "ELICE_DEPLOY_WAVE": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait(
            lambda: live_digest(cfg, STG, "course") == d2.digest or first.poll() is not None,
            240,
            "the first service's deploy",
        )
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(first.pid, signal.SIGKILL)  # no hook runs, no lock is released
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    killed_at = time.time()

    # the ledger: still the old release, and a promotion recorded as under way
    state = current_ledger().current(STG)
    pending = state.in_progress
    assert pending is not None
    assert {s: r.image.digest for s, r in state.services.items()} == dict.fromkeys(
        SERVICES, d1.digest
    )
    assert pending.previous["course"] is not None
    assert pending.previous["course"].image.digest == d1.digest
    assert {s: i.digest for s, i in pending.images.items()} == dict.fromkeys(SERVICES, d2.digest)
    assert serving(cfg, STG)["course"] == d2.digest  # the environment is mixed now

    # the health check says so in one line, naming the run (no traceback, no RuntimeError)
    checked = health_check(environment=STG, config_source=cfg_path, return_state=True)
    assert checked.is_failed()
    error = checked.result(raise_on_failure=False)
    assert isinstance(error, EnvironmentUnhealthy), error
    assert pending.flow_run_id in str(error)
    assert "course" in str(error)

    # the next promotion: waits at most one lease, undoes, marks, then promotes
    second = subprocess.run(
        [sys.executable, "-c", PROMOTE, STG, cfg_path],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = second.stdout + second.stderr
    assert "FINAL COMPLETED" in second.stdout, output[-4000:]
    assert f"run {pending.flow_run_id} died while deploying" in output

    history = current_ledger().history(STG)
    undone = [s for s in history if "died deploying" in s.change]
    assert len(undone) == 1, [s.change for s in history]
    recovered = undone[0]
    assert recovered.in_progress is None
    assert recovered.services == before.services  # the ledger named the old release all along
    assert recovered.updated_at.timestamp() - killed_at < 2 * LEASE_S, "found too late"
    final = current_ledger().current(STG)
    assert final.in_progress is None
    assert {s: r.image.digest for s, r in final.services.items()} == dict.fromkeys(
        SERVICES, d2.digest
    )
    assert serving(cfg, STG) == dict.fromkeys(SERVICES, d2.digest)

    with (
        temporary_settings(updates={PREFECT_API_URL: postgres_prefect.api_url}),
        get_client(sync_client=True) as client,
    ):
        dead = client.read_flow_run(UUID(pending.flow_run_id))
    assert dead.state is not None
    assert dead.state.type == StateType.CRASHED
    assert "died while deploying" in (dead.state.message or "")


def _paused_promotion(api_url: str, timeout: float = 240) -> UUID:
    end = time.monotonic() + timeout
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        while time.monotonic() < end:
            with get_client(sync_client=True) as client:
                runs = client.read_flow_runs(
                    flow_filter=FlowFilter(name=FlowFilterName(any_=["promote"])),
                    flow_run_filter=FlowRunFilter(
                        state=FlowRunFilterState(
                            type=FlowRunFilterStateType(any_=[StateType.PAUSED])
                        )
                    ),
                )
            for found in runs:
                with contextlib.suppress(Exception):
                    read_gate(found.id)
                    return found.id
            time.sleep(0.5)
    pytest.fail("no promote run paused at its gate")


def test_an_approval_resumes_a_promotion_across_a_server_restart(
    releases: tuple[PipelineConfig, str, ImageRef, ImageRef],
    postgres_prefect: PostgresPrefect,
    stack: StackInfo,
    tmp_path: Path,
) -> None:
    cfg, cfg_path, d1, d2 = releases
    people = Approvers(tmp_path, ["alice", "bob"])
    people.set_policy({PROD: {"approvers": ["alice", "bob"], "timeout_s": 600}})
    reviewed = protected_tip(people.repository)  # the promotion's repository: the policy's
    for service in SERVICES:
        put_verified(cfg, STG, service, d2, commit=reviewed)
        put_verified(cfg, PROD, service, d1, commit=reviewed)
    revision = current_ledger().current(PROD).revision
    api = postgres_prefect.api_url
    trust = trust_file_for(tmp_path, people.bare, environments=(DEV, STG, PROD))  # the child's
    signed = json.dumps(people.request(PROD, "alice"))
    env = {
        **os.environ,
        "PREFECT_API_URL": api,
        "DOCKER_HOST": stack.docker_host,
        TRUST_FILE_ENV: str(trust),
    }
    with (tmp_path / "prod.log").open("w") as log:
        job = subprocess.Popen(
            [sys.executable, "-c", PROMOTE, PROD, cfg_path, signed],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        run_id = _paused_promotion(api)
        down_s = postgres_prefect.restart()  # the run's process keeps polling meanwhile
        with temporary_settings(updates={PREFECT_API_URL: api}):
            read_gate(run_id)  # the pause and its form survived
            submit_answer(run_id, people.answer(run_id, "bob"))
        job.wait(timeout=300)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    output = (tmp_path / "prod.log").read_text()
    assert "FINAL COMPLETED" in output, output[-4000:]
    state = current_ledger().current(PROD)
    assert state.revision > revision
    assert state.in_progress is None
    assert state.services["course"].approved_by == "bob"
    assert serving(cfg, PROD) == dict.fromkeys(SERVICES, d2.digest)
    assert {s: r.image.digest for s, r in state.services.items()} == dict.fromkeys(
        SERVICES, d2.digest
    )
    assert down_s > 1  # it was down, not merely asked

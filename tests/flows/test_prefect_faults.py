"""The Prefect API failing under a promotion, injected by a proxy in front of the real test
server (PREFECT_API_URL points at the proxy, so the flow, its tasks, the deploy lock and
the approval gate reach the server only through it):

- during the deploy phase, a short outage is survived (the lock's lease is renewed again
  when the API answers) and the release ships;
- a lease the server no longer holds stops the deploy at its next safe point: every
  service is put back, the error names the lost lock, the ledger says so;
- an outage longer than the lease (the lease expiring, not revoked) does the same;
- during an approval wait, an outage longer than the client's own retries is waited out:
  it is no answer, nothing deploys, and a signed approval afterwards still ships.

Own environments (pf-dev -> pf-stg -> pf-prod, host ports 39xxx/43xxx), two services.
"""

from __future__ import annotations

import contextvars
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import docker
import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State
from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

from blocks.config import PipelineConfig, load_config
from blocks.stack import StackInfo
from blocks.storage import ledger_filesystem
from core.errors import PromotionRolledBack
from core.ledger import EnvironmentState
from core.records import ImageRef
from core.settings import Settings
from flows.promotion import promote
from tasks.approval import submit_answer
from tasks.audit import read_audit
from tasks.deploy.docker import DockerDeployer
from tasks.health import probe_health
from tasks.locks import LEASE_S, lock_name
from tests.approvers import Approvers, paused_promotion
from tests.flows.chain import (
    SERVICES,
    derive,
    protected_tip,
    put_verified,
    remove_containers,
    write_chain_config,
)
from tests.ledgers import current_ledger
from tests.plugins.faults import Fault, FaultProxy
from tests.trust import pin_repository

pytestmark = pytest.mark.stack

DEV, STG, PROD = "pf-dev", "pf-stg", "pf-prod"
RENEW = re.compile(r"/v2/concurrency_limits/leases/([0-9a-f-]{36})/renew")


@pytest.fixture
def direct_api() -> str:
    """The test server's own address (not the proxy's)."""
    return str(PREFECT_API_URL.value())


@pytest.fixture
def releases(
    tmp_path: Path,
    stack: StackInfo,
    docker_client: docker.DockerClient,
    pushed_image: ImageRef,
    direct_api: str,
    fault_proxy: type[FaultProxy],
) -> Iterator[tuple[PipelineConfig, str, ImageRef, ImageRef, FaultProxy]]:
    """pf-stg serves D1 of both services, pf-dev holds a verified D2; the API behind a
    proxy, the lock renewed every second, one service per wave."""
    host = direct_api.split("://", 1)[1].split("/", 1)[0]
    proxy = fault_proxy(host)
    mp = pytest.MonkeyPatch()
    mp.setenv("DOCKER_HOST", stack.docker_host)
    mp.setenv("ELICE_LOCK_RENEW_S", "1")
    mp.setenv("ELICE_DEPLOY_WAVE", "1")
    cfg_path = write_chain_config(
        tmp_path / "pipeline.yaml", [(DEV, 35100), (STG, 35600), (PROD, 25100)]
    )
    cfg = load_config(cfg_path)
    remove_containers(docker_client, [DEV, STG, PROD])
    d2 = derive(docker_client, pushed_image, "prefect-fault")
    for service in SERVICES:
        put_verified(cfg, STG, service, pushed_image)
        put_verified(cfg, DEV, service, d2)
    with temporary_settings({PREFECT_API_URL: direct_api.replace(host, proxy.address)}):
        yield cfg, cfg_path, pushed_image, d2, proxy
    remove_containers(docker_client, [DEV, STG, PROD])
    mp.undo()


def _serving(cfg: PipelineConfig, env: str) -> dict[str, str | None]:
    deployer = DockerDeployer()
    out: dict[str, str | None] = {}
    for name in SERVICES:
        spec = cfg.service(name)
        address = deployer.address(cfg.environment(env), spec)
        ok = probe_health(address, spec, deadline_s=10).ok
        out[name] = httpx.get(f"{address}/version", timeout=10).json()["digest"] if ok else None
    return out


def _when_deploying(env: str, then: Callable[[], None]) -> threading.Thread:
    """Call `then` once the ledger says a deploy into `env` is under way."""

    def watch() -> None:
        end = time.monotonic() + 300
        while current_ledger().current(env).in_progress is None:
            if time.monotonic() > end:
                return
            time.sleep(0.05)
        then()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _active_slots(environment: str, api: str) -> int:
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(lock_name(environment)).active_slots


def test_a_short_api_outage_during_the_deploys_is_survived(
    releases: tuple[PipelineConfig, str, ImageRef, ImageRef, FaultProxy], direct_api: str
) -> None:
    cfg, cfg_path, _, d2, proxy = releases
    outage: list[Fault] = []

    def blackout() -> None:  # every path: refused, then 503s, for 6 seconds in all
        now = time.monotonic()
        outage.append(proxy.inject(Fault("refuse", times=None, until=now + 3)))
        outage.append(proxy.inject(Fault("status", status=503, times=None, until=now + 6)))

    watcher = _when_deploying(STG, blackout)
    shipped = promote(
        environment=STG, config_source=cfg_path, promoted_by="ci", health_deadline_s=30
    )
    watcher.join(timeout=5)
    assert outage, "the deploy phase never started"
    assert sum(f.fired for f in outage) > 0
    renewals = [v for _, path, v in proxy.requests if RENEW.search(path)]
    failed = [v for v in renewals if v != "pass"]
    assert len(failed) >= 2, renewals  # renewals failed meanwhile, and were retried
    assert shipped.deployed == SERVICES
    assert _serving(cfg, STG) == dict.fromkeys(SERVICES, d2.digest)
    state = current_ledger().current(STG)
    assert state.in_progress is None
    assert {s: r.image.digest for s, r in state.services.items()} == dict.fromkeys(
        SERVICES, d2.digest
    )
    assert _active_slots(STG, direct_api) == 0


def _lost_lock_rolled_back(
    state: State[Any], cfg: PipelineConfig, d1: ImageRef, recorded: EnvironmentState
) -> PromotionRolledBack:
    """The promotion failed on its lost lock and put every service back on D1; the ledger
    notes the rollback and keeps its releases. Returns the error for the caller's cause."""
    assert state.is_failed(), state.message
    error = state.result(raise_on_failure=False)
    assert isinstance(error, PromotionRolledBack), repr(error)
    assert error.restored == dict.fromkeys(SERVICES, d1.digest)
    assert _serving(cfg, STG) == dict.fromkeys(SERVICES, d1.digest)
    after = current_ledger().current(STG)
    assert after.in_progress is None
    assert "rolled back" in after.change
    assert "was lost" in after.change
    assert after.services == recorded.services
    return error


def test_a_lost_lock_lease_stops_the_deploy_and_puts_every_service_back(
    releases: tuple[PipelineConfig, str, ImageRef, ImageRef, FaultProxy], direct_api: str
) -> None:
    """The server drops the lease mid-deploy (as an expiry or a server that lost its
    leases would): the next renewal hears 410, and the deploy stops before its next wave."""
    cfg, cfg_path, d1, _, proxy = releases
    recorded = current_ledger().current(STG)
    revoked: list[UUID] = []

    def revoke() -> None:
        end = time.monotonic() + 10  # the first renewal comes a second after the lock
        while not (leases := [m.group(1) for _, p, _ in proxy.requests if (m := RENEW.search(p))]):
            if time.monotonic() > end:
                return
            time.sleep(0.05)
        lease = UUID(leases[-1])
        with (
            temporary_settings({PREFECT_API_URL: direct_api}),
            get_client(sync_client=True) as client,
        ):
            client.release_concurrency_slots_with_lease(lease)
        revoked.append(lease)

    watcher = _when_deploying(STG, revoke)
    state = promote(
        environment=STG,
        config_source=cfg_path,
        promoted_by="ci",
        health_deadline_s=30,
        return_state=True,
    )
    watcher.join(timeout=5)
    assert revoked, "the deploy phase never started"
    error = _lost_lock_rolled_back(state, cfg, d1, recorded)
    assert f"the deploy lock {lock_name(STG)} was lost" in error.failed
    assert "HTTP 410" in error.failed


def test_an_api_outage_longer_than_the_lease_stops_the_deploy_and_puts_every_service_back(
    releases: tuple[PipelineConfig, str, ImageRef, ImageRef, FaultProxy],
    direct_api: str,
    stack: StackInfo,
    fault_proxy: type[FaultProxy],
) -> None:
    """Every request refused for longer than the lock's lease once the deploys are under
    way, while the engine is slow (each new container takes 50 s to be created): the
    lease expires on the server, nothing revokes it. The run stops at its next safe
    point, puts every service back and says why; the server frees the slot."""
    cfg, cfg_path, d1, _, proxy = releases
    engine = fault_proxy(stack.docker_host.removeprefix("unix://"))
    engine.inject(Fault("delay", method="POST", path="/containers/create", seconds=50, times=2))
    recorded = current_ledger().current(STG)
    outage: list[Fault] = []

    def blackout() -> None:
        until = time.monotonic() + LEASE_S + 10
        outage.append(proxy.inject(Fault("refuse", times=None, until=until)))

    watcher = _when_deploying(STG, blackout)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DOCKER_HOST", f"tcp://{engine.address}")
        state = promote(
            environment=STG,
            config_source=cfg_path,
            promoted_by="ci",
            health_deadline_s=30,
            return_state=True,
        )
    watcher.join(timeout=5)
    assert outage, "the deploy phase never started"
    error = _lost_lock_rolled_back(state, cfg, d1, recorded)
    assert f"the deploy lock {lock_name(STG)} was lost (not renewed for" in error.failed
    # The run gave nothing back (the lease was no longer its own): the server's repossessor
    # frees an expired lease's slot, which the test server does not run; freed here.
    leases = {m.group(1) for _, path, _ in proxy.requests if (m := RENEW.search(path))}
    assert len(leases) == 1, leases
    with temporary_settings({PREFECT_API_URL: direct_api}), get_client(sync_client=True) as c:
        c.release_concurrency_slots_with_lease(UUID(leases.pop()))
    assert _active_slots(STG, direct_api) == 0


def test_an_api_outage_during_the_approval_wait_is_no_answer(
    releases: tuple[PipelineConfig, str, ImageRef, ImageRef, FaultProxy],
    tmp_path: Path,
    direct_api: str,
) -> None:
    """The client retries nothing by itself here (PREFECT_CLIENT_MAX_RETRIES=0): an
    outage of a few seconds outlasts it, as a longer one outlasts its default retries."""
    cfg, _, d1, d2, proxy = releases
    people = Approvers(tmp_path, ["alice", "bob"])
    people.set_policy({PROD: {"approvers": ["alice", "bob"], "timeout_s": 300}})
    mp = pytest.MonkeyPatch()
    pin_repository(mp, tmp_path, people.bare, environments=(DEV, STG, PROD))
    reviewed = protected_tip(people.repository)
    for service in SERVICES:
        put_verified(cfg, STG, service, d2, commit=reviewed)
        put_verified(cfg, PROD, service, d1, commit=reviewed)
    revision = current_ledger().current(PROD).revision
    cfg_path = releases[1]
    states: queue.Queue[Any] = queue.Queue()
    try:
        with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}):
            context = contextvars.copy_context()
        job = threading.Thread(
            target=context.run,
            args=(
                lambda: states.put(
                    promote(
                        environment=PROD,
                        config_source=cfg_path,
                        health_deadline_s=30,
                        return_state=True,
                        **people.request(PROD, "alice"),
                    )
                ),
            ),
            daemon=True,
        )
        job.start()
        with temporary_settings({PREFECT_API_URL: direct_api}):
            run_id = paused_promotion(set(), timeout=240)
        seen = len(proxy.requests)
        now = time.monotonic()
        proxy.inject(Fault("refuse", times=None, until=now + 3))
        proxy.inject(Fault("status", status=503, times=None, until=now + 6))
        time.sleep(7)
        during = [v for _, path, v in proxy.requests[seen:] if f"/flow_runs/{run_id}" in path]
        assert {"refuse", "status"} <= set(during), during  # the wait kept asking
        with temporary_settings({PREFECT_API_URL: direct_api}):
            assert paused_promotion(set(), timeout=30) == run_id  # it still waits
            assert current_ledger().current(PROD).revision == revision  # nothing deployed
            submit_answer(run_id, people.answer(run_id, "bob"))
        state = states.get(timeout=240)
    finally:
        mp.undo()
    assert state.is_completed(), state.message
    assert state.result().approved_by == "bob"
    assert _serving(cfg, PROD) == dict.fromkeys(SERVICES, d2.digest)
    record = current_ledger().current(PROD)
    assert record.in_progress is None
    assert record.services["course"].approved_by == "bob"
    trail = read_audit(ledger_filesystem(Settings.from_environ()), PROD)
    kinds = [e.kind for e in trail if e.run_id == str(run_id)]
    assert kinds == ["requested", "approved"]  # the outage was no answer

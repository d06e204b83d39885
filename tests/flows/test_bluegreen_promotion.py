"""Blue-green promotions on the docker target: real engine, registry, Prefect server, a
pinned policy repository whose `config/approvals.yaml` gives bg-stg's analysis
`rollout: blue-green`, and a real Prometheus configured like the stack's (its services'
targets, and the green targets the deployer writes into the stack's folder).

The load probe's own error limit is relaxed so that the analysis is what judges green. In
file order:

    seed D1 -> D2 healthy (judged as green, switched; D1's container gone)
            -> D3 half its requests 500 under load (stopped at the green step: D2's
               container never stopped, polled throughout; nothing recorded but the attempt)
            -> D4 unhealthy (stopped at green before any analysis)
            -> D5 with Prometheus unreachable (inconclusive: stopped at green)
    a green of D5 left by a dead run -> removed by the next rollback
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from blocks.config import PipelineConfig, load_config
from blocks.stack import StackInfo, green_targets_dir, stack_dir
from blocks.storage import ledger_filesystem
from core.errors import PromotionRolledBack
from core.records import ImageRef
from core.settings import Settings
from flows.promotion import promote, rollback
from stack.ports import free_port
from tasks.audit import read_audit
from tasks.deploy.bluegreen import write_green_target
from tasks.deploy.docker import DockerDeployer, container_name
from tests.approvers import Approvers
from tests.flows.chain import derive, put_verified, remove_containers, write_chain_config
from tests.flows.test_analysis_promotion import ANALYSIS
from tests.ledgers import current_ledger
from tests.prometheus import running_prometheus
from tests.trust import pin_repository

pytestmark = pytest.mark.stack

DEV, STG = "bg-dev", "bg-stg"
SERVICE = "course"
GREEN_PORT_OFFSET = 13100
BLUE_GREEN = ANALYSIS | {"rollout": "blue-green", "green_port_offset": GREEN_PORT_OFFSET}


@dataclass
class Setup:
    cfg: PipelineConfig
    cfg_path: str
    unreachable_cfg_path: str
    images: dict[str, ImageRef]
    client: docker.DockerClient
    green_targets: Path


def _config(folder: Path, name: str, prometheus_url: str | None) -> str:
    """The chain's configuration, bg-stg's Prometheus named, the probe's error limit relaxed."""
    extra = {STG: {"prometheus_url": prometheus_url}} if prometheus_url else {}
    return write_chain_config(
        folder / name,
        [(DEV, 12100), (STG, 12600)],
        [(SERVICE, 8004)],
        performance={"max_error_rate": 1.0},
        **extra,
    )


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
    stack: StackInfo,
    docker_client: docker.DockerClient,
    pushed_image: ImageRef,
) -> Iterator[Setup]:
    """bg-stg serves D1; its blue-green analysis is in the pinned policy; Prometheus scrapes
    its services and the green targets of the stack's folder."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DOCKER_HOST", stack.docker_host)
    folder = tmp_path_factory.mktemp("bluegreen")
    scraped = load_config(_config(folder, "targets.yaml", None))
    green_targets = green_targets_dir(stack_dir())
    with running_prometheus(folder / "prometheus", scraped, green_targets) as url:
        cfg_path = _config(folder, "pipeline.yaml", url)
        unreachable = _config(folder, "unreachable.yaml", f"http://127.0.0.1:{free_port()}")
        people = Approvers(folder, ["alice"])
        people.set_policy({}, analysis={STG: BLUE_GREEN})
        pin_repository(mp, folder, people.bare, environments=(DEV, STG))
        cfg = load_config(cfg_path)
        remove_containers(docker_client, [DEV, STG])
        images = {"D1": pushed_image}
        for name in ("D2", "D3", "D4", "D5"):
            images[name] = derive(docker_client, pushed_image, f"bg-{name.lower()}")
        put_verified(cfg, STG, SERVICE, images["D1"])
        yield Setup(cfg, cfg_path, unreachable, images, docker_client, green_targets)
    remove_containers(docker_client, [DEV, STG])
    mp.undo()


def _blue(s: Setup) -> Any:
    return s.client.containers.get(container_name("elice", STG, SERVICE))


def _no_green(s: Setup) -> None:
    with pytest.raises(docker.errors.NotFound):
        s.client.containers.get(container_name("elice", STG, SERVICE) + "-green")
    assert not (s.green_targets / f"{STG}-{SERVICE}.json").exists()


def analysis_rows(flow_run_id: object) -> list[dict[str, str]]:
    """The rows of the run's `analysis-bg-stg` table artifact."""
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"analysis-{STG}"]))
        )
    (mine,) = [a for a in artifacts if a.flow_run_id == flow_run_id]
    data = mine.data if isinstance(mine.data, list) else json.loads(str(mine.data))
    return list(data)


def _audit_kinds(run_id: object) -> list[str]:
    store = ledger_filesystem(Settings.from_environ())
    return [e.kind for e in read_audit(store, STG) if e.run_id == str(run_id)]


@dataclass
class Poller:
    """Asks the environment's recorded address for /version every 0.2 s in a thread."""

    address: str
    answers: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                answer = httpx.get(f"{self.address}/version", timeout=5)
                self.answers.append(answer.json()["digest"])
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                self.answers.append(f"failed: {type(exc).__name__}: {exc}")
            self.stop.wait(0.2)


def test_a_healthy_release_is_judged_as_green_then_switched_and_blue_removed(
    setup: Setup,
) -> None:
    blue_id = _blue(setup).id
    put_verified(setup.cfg, DEV, SERVICE, setup.images["D2"])
    state = promote(
        environment=STG, config_source=setup.cfg_path, health_deadline_s=30, return_state=True
    )
    outcome = state.result()
    assert outcome.deployed == [SERVICE]
    record = current_ledger().current(STG).services[SERVICE]
    assert record.image.digest == setup.images["D2"].digest
    assert record.analysis is not None
    assert record.analysis.startswith("passed at http://127.0.0.1:")
    rows = analysis_rows(state.state_details.flow_run_id)
    assert all(r["verdict"] == "passed" for r in rows)
    # judged on green alone: the policy's queries rendered with the green scrape label
    assert all(f'environment="{STG}-green"' in r["query"] for r in rows)
    serving = _blue(setup)
    assert serving.labels["io.elice.digest"] == setup.images["D2"].digest
    assert serving.id != blue_id
    with pytest.raises(docker.errors.NotFound):
        setup.client.containers.get(blue_id)  # the old blue is gone once the switch held
    _no_green(setup)
    address = DockerDeployer().address(setup.cfg.environment(STG), setup.cfg.service(SERVICE))
    assert httpx.get(f"{address}/version", timeout=10).json()["digest"] == record.image.digest
    assert "switched" in _audit_kinds(state.state_details.flow_run_id)


def _stopped_at_green(setup: Setup, image: str, **params: Any) -> str:
    """Promote `image` into bg-stg, expect it stopped at the green step with nothing lost:
    a poller of the recorded address saw D2 only, blue's container never restarted, no
    green left, the ledger records the attempt only, the audit trail says why. Returns
    the error's message."""
    d2 = setup.images["D2"].digest
    put_verified(setup.cfg, DEV, SERVICE, setup.images[image])
    blue = _blue(setup)
    started = blue.attrs["State"]["StartedAt"]
    before = current_ledger().current(STG)
    address = DockerDeployer().address(setup.cfg.environment(STG), setup.cfg.service(SERVICE))
    poller = Poller(address)
    thread = threading.Thread(target=poller.run, daemon=True)
    thread.start()
    try:
        with pytest.raises(PromotionRolledBack) as caught:
            promote(environment=STG, **params)
    finally:
        time.sleep(0.5)
        poller.stop.set()
        thread.join(timeout=10)
    message = str(caught.value)
    assert f"blue-green stopped at the green step in {STG}" in message
    assert caught.value.restored == {SERVICE: d2}
    # blue served the recorded address throughout: every answer D2, none failed
    assert len(poller.answers) > 10
    assert set(poller.answers) == {d2}, [a for a in poller.answers if a != d2][:3]
    blue.reload()
    assert (blue.status, blue.attrs["State"]["StartedAt"]) == ("running", started)
    _no_green(setup)
    after = current_ledger().current(STG)
    assert after.services == before.services
    assert after.revision == before.revision + 2
    assert after.in_progress is None
    assert "blue-green stopped at the green step" in after.change
    entries = read_audit(ledger_filesystem(Settings.from_environ()), STG)
    stopped = [e for e in entries if e.kind == "green_stopped"]
    assert stopped
    assert stopped[-1].detail in message
    return message


def test_a_release_failing_under_load_is_stopped_at_green_while_blue_serves(
    setup: Setup,
) -> None:
    d3 = setup.images["D3"].digest
    message = _stopped_at_green(
        setup,
        "D3",
        config_source=setup.cfg_path,
        health_deadline_s=30,
        drill_env={d3: {"FAULT_ERROR_PERCENT": "50"}},
    )
    assert f"analysis failed in {STG}" in message
    assert f'environment="{STG}-green"' in message


def test_an_unhealthy_green_is_removed_and_never_judged(setup: Setup) -> None:
    d4 = setup.images["D4"].digest
    message = _stopped_at_green(
        setup,
        "D4",
        config_source=setup.cfg_path,
        health_deadline_s=8,
        drill_env={d4: {"FAULT_HEALTH": "1"}},
    )
    assert "failed its health check as green in bg-stg" in message
    assert "analysis" not in message


def test_an_unreachable_prometheus_is_inconclusive_and_stops_green(setup: Setup) -> None:
    message = _stopped_at_green(
        setup, "D5", config_source=setup.unreachable_cfg_path, health_deadline_s=30
    )
    assert f"analysis inconclusive in {STG} (never a pass)" in message
    assert "did not answer" in message


def test_a_green_a_dead_run_left_is_removed_by_the_next_rollback(
    setup: Setup, stack: StackInfo
) -> None:
    """A run killed between starting green and the switch leaves green serving on its
    green port and scraped as bg-stg-green. The next run holding the environment's lock (a
    rollback here; a promotion the same) removes the container and its scrape target."""
    env, service = setup.cfg.environment(STG), setup.cfg.service(SERVICE)
    d5, deployer = setup.images["D5"], DockerDeployer(stack.docker_host)
    address = deployer.start_green(env, service, d5, GREEN_PORT_OFFSET, deadline_s=30)
    write_green_target(setup.green_targets, env, service, address)
    assert httpx.get(f"{address}/version", timeout=5).json()["digest"] == d5.digest

    back = rollback(environment=STG, config_source=setup.cfg_path, return_state=True)

    assert back.is_completed(), back.message
    _no_green(setup)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{address}/version", timeout=5)
    serving = current_ledger().current(STG).services[SERVICE].image.digest
    served = httpx.get(f"{deployer.address(env, service)}/version", timeout=5)
    assert served.json()["digest"] == serving != d5.digest

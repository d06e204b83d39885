"""The CI flow through delivery: build, scan, push, deploy to an environment, health check.

Real engine, real registry, real containers. The environment is `ci-dev` on its own
ports, so a developer's dev containers are never touched. The checkout is checked in
place; its commit is pushed to the bare remote the repository block pins, so it ships.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prefect.client.schemas.objects import State

from core.records import CiOutcome
from flows.ci import ci, ci_outcome
from tasks.locks import deploy_lock
from tasks.registry import verify_release_image
from tests.ledgers import current_ledger
from tests.tasks.ci_checkout import copy_monorepo, pinned

REPO = Path(__file__).resolve().parents[2]
SERVICES = ["auth", "course", "media"]
ENV = "ci-dev"
OFFSET = 35000
HOLD_S = 300
"""How long the unchanged run's test holds deploy-ci-dev at most (the run takes seconds)."""


@pytest.fixture(scope="module")
def delivery(stack, docker_client) -> Iterator[dict[str, Any]]:
    """A monorepo checkout pushed to the pinned repository, a config whose only environment
    is ci-dev."""
    root = Path(tempfile.mkdtemp(prefix="ci-delivery-"))
    repo = copy_monorepo(root / "repo", SERVICES)
    data = yaml.safe_load((REPO / "config" / "pipeline.yaml").read_text())
    data["environments"] = [
        {
            "name": ENV,
            "namespace": "elice-ci-dev",
            "replicas": {"min": 1, "max": 1},
            "log_level": "DEBUG",
            "storage": "minio",
            "local_port_offset": OFFSET,
        }
    ]
    config = root / "pipeline.yaml"
    config.write_text(yaml.safe_dump(data))
    with pytest.MonkeyPatch.context() as patch, pinned(repo):
        patch.setenv("DOCKER_HOST", stack.docker_host)
        yield {"repo": repo, "config": str(config)}
    for container in docker_client.containers.list(all=True, filters={"name": f"elice-{ENV}-"}):
        container.remove(force=True)


def _run(delivery: dict[str, Any]) -> State[Any]:
    return ci(
        services=SERVICES,
        repo=str(delivery["repo"]),
        deliver=True,
        environment=ENV,
        config_source=delivery["config"],
        return_state=True,
    )


def _outcome(state: State[Any]) -> CiOutcome:
    outcome = ci_outcome(state)
    assert outcome is not None, state.message
    return outcome


@pytest.fixture(scope="module")
def first(delivery) -> State[Any]:
    return _run(delivery)


def test_every_service_is_built_pushed_deployed_and_healthy(first, config) -> None:
    assert first.is_completed(), first.message
    outcome = _outcome(first)
    assert outcome.protected
    assert outcome.shipped
    ledger = current_ledger().current(ENV)
    for name in SERVICES:
        stages = {r.stage: r for r in outcome.results if r.service == name}
        for stage in ("image", "deploy", "health", "record"):
            assert stages[stage].status == "passed", (name, stage, stages[stage].summary)
        # The scan of a lock file is cached across runs: another module on this worker may
        # have scanned the same lock first.
        assert stages["scan"].status in {"passed", "cached"}, (name, stages["scan"].summary)
        record = ledger.services[name]
        assert record.verified
        assert record.scan in {"unknown", "clean"}
        assert stages["image"].details["digest"] == record.image.digest
        port = config.service(name).port + OFFSET
        version = httpx.get(f"http://127.0.0.1:{port}/version", timeout=10).json()
        assert version["digest"] == record.image.digest
        assert version["environment"] == ENV
        # the image's own label: an identical image built from an earlier commit is reused
        # by digest, so the label may name that commit; the ledger records both
        assert version["commit"] == record.image.commit
        assert record.commit == outcome.commit


def test_an_unchanged_service_is_neither_rebuilt_nor_redeployed(first, delivery, docker_client):
    before = {
        c.name: c.id for c in docker_client.containers.list(filters={"name": f"elice-{ENV}-"})
    }
    assert len(before) == len(SERVICES)
    # another holds deploy-<env> all the while: a run with nothing to deploy does not wait
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with deploy_lock(ENV):
            held.set()
            release.wait(HOLD_S)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(60), "the test could not take deploy-ci-dev"
    try:
        again = _run(delivery)
        assert holder.is_alive(), "the rerun waited until the other holder let go"
    finally:
        release.set()
        holder.join(60)
    assert again.is_completed(), again.message
    outcome = _outcome(again)
    for name in SERVICES:
        stages = {r.stage: r for r in outcome.results if r.service == name}
        assert "already published" in stages["image"].summary
        assert "already serves" in stages["deploy"].summary
    after = {c.name: c.id for c in docker_client.containers.list(filters={"name": f"elice-{ENV}-"})}
    assert after == before
    # a reused image is recorded with the commit it was built from, so promotion's
    # image check (digest present, revision label = recorded commit) accepts it
    ledger = current_ledger().current(ENV)
    for name in SERVICES:
        assert verify_release_image.fn(ledger.services[name].image) == ledger.services[name].image

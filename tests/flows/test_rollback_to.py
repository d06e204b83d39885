"""`rollback --to RELEASE`: back to any release of the ledger, verified like a promotion.

Real engine, registry, Prefect server and a pinned repository (the policy repository of
`tests/approvers.py`, no gate). Own environments rt-dev -> rt-stg (host ports 39xxx), two
services. The tests run in file order on one release train:

    seed (D1, both services) -> R2 (D2, promoted) -> R3 (D3, promoted)
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import docker
import httpx
import pytest

from blocks.config import PipelineConfig, load_config
from blocks.repository import pinned_repository
from blocks.stack import StackInfo
from blocks.storage import ledger_filesystem
from core.errors import PromotionRefused
from core.records import ImageRef
from core.settings import Settings
from flows.promotion import promote, rollback
from tasks.deploy.docker import DockerDeployer
from tasks.health import probe_health
from tasks.history import ReleaseStatus, history_of
from tasks.images import environment_registry
from tasks.releases import ReleaseRecord
from tests.approvers import Approvers
from tests.flows.chain import (
    SERVICES,
    as_service,
    derive,
    protected_tip,
    put_verified,
    remove_containers,
    write_chain_config,
)
from tests.ledgers import current_ledger
from tests.tasks.ci_checkout import git, push_commit
from tests.trust import pin_repository

pytestmark = pytest.mark.stack

DEV, STG = "rt-dev", "rt-stg"


@dataclass
class Train:
    cfg: PipelineConfig
    cfg_path: str
    people: Approvers
    images: dict[str, ImageRef]
    releases: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def train(
    tmp_path_factory: pytest.TempPathFactory,
    stack: StackInfo,
    docker_client: docker.DockerClient,
    pushed_image: ImageRef,
) -> Iterator[Train]:
    """rt-stg's ledger holds seed (D1), then R2 (D2) and R3 (D3), each promoted from rt-dev."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DOCKER_HOST", stack.docker_host)
    folder = tmp_path_factory.mktemp("rollback-to")
    cfg_path = write_chain_config(folder / "pipeline.yaml", [(DEV, 28100), (STG, 28600)])
    people = Approvers(folder, ["alice"])
    people.set_policy({})
    pin_repository(mp, folder, people.bare, environments=(DEV, STG))
    cfg = load_config(cfg_path)
    remove_containers(docker_client, [DEV, STG])
    images = {
        "D1": pushed_image,
        "D2": derive(docker_client, pushed_image, "rt-two"),
        "D3": derive(docker_client, pushed_image, "rt-three"),
    }
    t = Train(cfg, cfg_path, people, images)
    for service in SERVICES:
        put_verified(cfg, STG, service, images["D1"])
    t.releases["seed"] = f"seed-{images['D1'].short}"
    for name in ("D2", "D3"):
        for service in SERVICES:
            put_verified(cfg, DEV, service, images[name])
        outcome = promote(environment=STG, config_source=cfg_path, health_deadline_s=30)
        t.releases[name] = outcome.plan.release_id
    yield t
    remove_containers(docker_client, [DEV, STG])
    mp.undo()


def serving(t: Train) -> dict[str, str | None]:
    """The digest each service's /version reports in rt-stg (None: not healthy)."""
    deployer = DockerDeployer()
    out: dict[str, str | None] = {}
    for name in SERVICES:
        spec = t.cfg.service(name)
        address = deployer.address(t.cfg.environment(STG), spec)
        ok = probe_health(address, spec, deadline_s=10).ok
        out[name] = httpx.get(f"{address}/version", timeout=10).json()["digest"] if ok else None
    return out


def history(t: Train) -> list[ReleaseStatus]:
    settings = Settings.from_environ()
    return history_of(
        (ledger_filesystem(settings), t.cfg.catalog.names()),
        STG,
        pinned_repository(settings),
        environment_registry(t.cfg.environment(STG), None),
    )


def test_history_lists_the_releases_newest_first_and_which_serves(train: Train) -> None:
    listed = history(train)
    ids = [s.release.release_id for s in listed]
    assert ids == [train.releases["D3"], train.releases["D2"], train.releases["seed"]]
    newest, middle, oldest = listed
    assert newest.serving == SERVICES
    assert not newest.returnable  # it serves: nothing to return to
    assert not newest.problems
    assert middle.returnable
    assert oldest.returnable
    assert oldest.serving == []
    assert {n: r.image.digest for n, r in oldest.release.records.items()} == dict.fromkeys(
        SERVICES, train.images["D1"].digest
    )


def test_rollback_to_an_older_release_skips_the_one_before(train: Train) -> None:
    """From R3 straight back to seed: both services serve D1, one ledger revision records
    it, R3 is kept as previous; a plain rollback then returns to R3 as before."""
    seed = train.releases["seed"]
    restored = rollback(
        environment=STG, config_source=train.cfg_path, to_release=seed, requested_by="oncall"
    )
    d1, d3 = train.images["D1"].digest, train.images["D3"].digest
    assert restored == dict.fromkeys(SERVICES, d1)
    assert serving(train) == dict.fromkeys(SERVICES, d1)
    state = current_ledger().current(STG)
    assert state.change == f"returned to release {seed} by oncall"
    assert state.in_progress is None
    assert {n: r.release_id for n, r in state.services.items()} == dict.fromkeys(SERVICES, seed)
    assert all(r.verified for r in state.services.values())
    assert {n: r.image.digest for n, r in state.previous.items()} == dict.fromkeys(SERVICES, d3)
    back = rollback(environment=STG, config_source=train.cfg_path, requested_by="oncall")
    assert back == dict.fromkeys(SERVICES, d3)
    assert serving(train) == dict.fromkeys(SERVICES, d3)


def _refused(t: Train, release: str) -> PromotionRefused:
    """The rollback to `release` is refused; rt-stg's ledger and services are unchanged."""
    before = current_ledger().current(STG)
    live = serving(t)
    state = rollback(
        environment=STG, config_source=t.cfg_path, to_release=release, return_state=True
    )
    error = state.result(raise_on_failure=False)
    assert isinstance(error, PromotionRefused), error
    assert current_ledger().current(STG).revision == before.revision
    assert serving(t) == live
    return error


def test_an_unknown_release_is_refused_by_name_before_anything_changes(train: Train) -> None:
    error = _refused(train, "no-such-release")
    assert "release 'no-such-release' is not in the ledger of rt-stg" in str(error)
    assert f"cicd history {STG}" in str(error)


def _plant(t: Train, release: str, image: ImageRef, commit: str) -> None:
    """A release recorded in rt-stg's ledger (then superseded, so it is history only)."""
    ledger = current_ledger()
    serving_now = ledger.current(STG).services
    for service in SERVICES:
        ledger.record_deploy(
            STG,
            ReleaseRecord(
                service=service,
                environment=STG,
                image=as_service(image, service),
                release_id=release,
                verified=True,
                ref="refs/heads/main",
                commit=commit,
            ),
        )
        ledger.record_deploy(STG, serving_now[service])


def test_a_release_whose_image_is_gone_is_refused_by_name(train: Train) -> None:
    gone = train.images["D1"].model_copy(update={"digest": f"sha256:{uuid.uuid4().hex * 2}"})
    _plant(train, "gone-1", gone, protected_tip())
    error = _refused(train, "gone-1")
    assert f"{STG} cannot return to release gone-1" in str(error)
    assert "course: image gone or unusable" in str(error)
    assert gone.digest in str(error)
    listed = {s.release.release_id: s for s in history(train)}
    assert not listed["gone-1"].returnable
    assert any("image gone" in p for p in listed["gone-1"].problems)


def test_a_release_of_an_unreviewed_commit_is_refused_by_name(train: Train) -> None:
    work = train.people.work
    git(work, "checkout", "-q", "-b", "unreviewed")
    commit = push_commit(work, "backdoor.txt", "never reviewed\n", branch="unreviewed")
    git(work, "checkout", "-q", "main")
    _plant(train, "unreviewed-1", train.images["D2"], commit)
    error = _refused(train, "unreviewed-1")
    assert f"commit {commit} is not on main" in str(error)
    listed = {s.release.release_id: s for s in history(train)}
    assert not listed["unreviewed-1"].returnable
    assert listed[train.releases["D2"]].returnable  # the same images, reviewed: still fine

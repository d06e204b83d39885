"""Promotion accepts only releases built from reviewed commits, as a fresh fetch sees them.

The repository block points at a real bare remote (the approval policy's repository,
main holding the policy). rv-stg serves a release of `course`; rv-dev serves and records
a newer one whose commit is either on no protected branch (planted) or was on main when
recorded and force-pushed away since. Either way the promotion is refused with the SHA
named, before anything is backed up, copied or deployed: rv-stg keeps its release, its
ledger keeps its revision. Own environments (rv-dev -> rv-stg, host ports 46xxx/41xxx).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import docker
import pytest

from blocks.config import PipelineConfig, load_config
from blocks.stack import StackInfo
from core.errors import PromotionRefused
from core.records import ImageRef, PromotionOutcome
from flows.promotion import promote
from tasks.deploy.docker import DockerDeployer
from tests.approvers import Approvers
from tests.flows.chain import (
    derive,
    put_release,
    put_verified,
    remove_containers,
    write_chain_config,
)
from tests.ledgers import current_ledger
from tests.tasks.ci_checkout import git, push_commit
from tests.trust import pin_repository

pytestmark = pytest.mark.stack

DEV, STG = "rv-dev", "rv-stg"
SERVICE = "course"


@dataclass(frozen=True)
class Setup:
    cfg: PipelineConfig
    cfg_path: str
    people: Approvers
    d1: ImageRef
    d2: ImageRef


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
    stack: StackInfo,
    docker_client: docker.DockerClient,
    pushed_image: ImageRef,
) -> Iterator[Setup]:
    """The policy repository as the pinned one; rv-stg serving D1 from a reviewed commit."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DOCKER_HOST", stack.docker_host)
    folder = tmp_path_factory.mktemp("reviewed")
    cfg_path = write_chain_config(
        folder / "pipeline.yaml", [(DEV, 38600), (STG, 33600)], services=[(SERVICE, 8004)]
    )
    people = Approvers(folder, ["alice"])
    people.set_policy({})  # no gate: a refusal here is the commit check's alone
    pin_repository(mp, folder, people.bare, environments=(DEV, STG))
    cfg = load_config(cfg_path)
    remove_containers(docker_client, [DEV, STG])
    put_verified(cfg, STG, SERVICE, pushed_image)  # the tip of main: reviewed
    d2 = derive(docker_client, pushed_image, "reviewed")
    yield Setup(cfg, cfg_path, people, pushed_image, d2)
    remove_containers(docker_client, [DEV, STG])
    mp.undo()


def _in_dev(s: Setup, commit: str) -> None:
    """What CI records in rv-dev: D2 deployed, verified, from the protected ref, `commit`."""
    put_release(
        DockerDeployer(), s.cfg, DEV, SERVICE, s.d2, release_id=f"ci-{commit[:8]}", commit=commit
    )


def _refused(s: Setup, commit: str) -> None:
    """A promotion into rv-stg is refused naming `commit`; rv-stg keeps D1 and its ledger."""
    before = current_ledger().current(STG)
    state = promote(environment=STG, config_source=s.cfg_path, return_state=True)
    error = state.result(raise_on_failure=False)
    assert isinstance(error, PromotionRefused), error
    assert f"{SERVICE} ({s.d2.short}): commit {commit} is not on main of" in str(error)
    after = current_ledger().current(STG)
    assert after.revision == before.revision  # no intent, no record: nothing began
    assert after.services[SERVICE].image.digest == s.d1.digest
    live = DockerDeployer().live(s.cfg.environment(STG), s.cfg.service(SERVICE))
    assert live is not None
    assert live.image.digest == s.d1.digest


def test_a_planted_release_of_an_unreviewed_commit_is_not_promoted(setup: Setup) -> None:
    work = setup.people.work
    git(work, "checkout", "-q", "-b", "unreviewed")
    planted = push_commit(work, "backdoor.txt", "never reviewed\n", branch="unreviewed")
    git(work, "checkout", "-q", "main")
    _in_dev(setup, planted)
    _refused(setup, planted)


def test_a_release_whose_commit_was_force_pushed_off_main_is_not_promoted(
    setup: Setup,
) -> None:
    work = setup.people.work
    base = git(work, "rev-parse", "HEAD").strip()
    merged = push_commit(work, "feature.txt", "merged for a while\n")
    _in_dev(setup, merged)
    planned = promote(environment=STG, config_source=setup.cfg_path, dry_run=True)
    assert isinstance(planned, PromotionOutcome)
    assert planned.plan.changes[0].commit == merged  # on main: the plan passes the check
    git(work, "reset", "-q", "--hard", base)
    git(work, "push", "-q", "--force", "origin", "main")
    _refused(setup, merged)

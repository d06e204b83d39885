"""Deploy windows: the policy's freezes judged at a fixed clock, overrides signed with real
SSH keys, and a promotion into a frozen environment against the real stack.

The clock is injected the way a drill injects it: the ELICE_CLOCK setting for the flow,
an argument for the functions below it. Own environments fz-dev -> fz-stg (ports 37xxx).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml
from prefect.filesystems import LocalFileSystem

from blocks.approvals import ApprovalPolicy, parse_policy
from blocks.config import PipelineConfig, load_config
from blocks.stack import StackInfo
from blocks.storage import ledger_filesystem
from core.errors import ConfigError, PromotionRefused
from core.records import ImageRef
from core.settings import Settings
from core.windows import DeployWindows, clock_now, frozen_at, parse_clock
from flows.promotion import promote
from tasks.audit import read_audit
from tasks.deploy.docker import DockerDeployer
from tasks.freeze import check_deploy_window, deploy_clock, require_overridden, sign_override
from tests.approvers import Approvers
from tests.flows.chain import SERVICES, derive, put_verified, remove_containers, write_chain_config
from tests.ledgers import current_ledger
from tests.trust import pin_repository, trust_file_for

SEOUL = "Asia/Seoul"
WINDOWS: dict[str, Any] = {
    "time_zone": SEOUL,
    "freezes": [{"start": "2026-12-24", "end": "2026-12-26", "reason": "year-end freeze"}],
    "weekly": [
        {"days": ["fri"], "start": "18:00", "end": "09:00", "reason": "weekend"},
    ],
    "override_approvers": ["alice", "bob", "carol"],
}
# Thursday 2026-12-24 10:00 in Seoul is 01:00 UTC: inside the year-end freeze.
FROZEN = datetime(2026, 12, 24, 1, 0, tzinfo=UTC)


def windows() -> DeployWindows:
    return DeployWindows.model_validate(WINDOWS)


# --- the policy, pure ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local", "reason"),
    [
        ("2026-12-23T23:59:00+09:00", None),  # the day before, in Seoul
        ("2026-12-24T00:00:00+09:00", "year-end freeze"),  # the first minute
        ("2026-12-26T23:59:00+09:00", "year-end freeze"),  # the last day is included
        ("2026-12-26T15:30:00+00:00", None),  # 00:30 on the 27th in Seoul: over
        ("2026-12-11T18:00:00+09:00", "weekend"),  # a Friday evening
        ("2026-12-12T08:59:00+09:00", "weekend"),  # past midnight, into Saturday morning
        ("2026-12-12T09:00:00+09:00", None),  # the window's end is open
        ("2026-12-10T20:00:00+09:00", None),  # a Thursday evening
    ],
)
def test_freezes_hold_in_the_policy_time_zone(local: str, reason: str | None) -> None:
    found = frozen_at(windows(), parse_clock(local))
    assert (found.reason if found else None) == reason


def test_a_freeze_names_its_period_in_local_time() -> None:
    found = frozen_at(windows(), FROZEN)
    assert found is not None
    assert found.describe() == "'year-end freeze' (2026-12-24 00:00 to 2026-12-27 00:00 KST)"


def test_no_windows_or_a_naive_instant() -> None:
    assert frozen_at(None, FROZEN) is None
    with pytest.raises(ValueError, match="timezone-aware"):
        frozen_at(windows(), datetime(2026, 12, 24, 10, 0))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"time_zone": "Mars/Olympus"}, "not an IANA time zone"),
        ({"freezes": [{"start": "2026-12-26", "end": "2026-12-24", "reason": "x"}]}, "before"),
        ({"weekly": [{"days": ["fry"], "start": "1:00", "end": "2:00", "reason": "x"}]}, "fry"),
        ({"freezes": [{"start": "2026-12-24", "end": "2026-12-24"}]}, "reason"),
        ({"frozen": True}, "frozen"),
    ],
)
def test_a_bad_policy_is_refused_naming_the_field(change: dict[str, Any], message: str) -> None:
    data = {"deploy_windows": {"fz-stg": WINDOWS | change}}
    with pytest.raises(ConfigError, match=message) as caught:
        parse_policy(yaml.safe_dump(data))
    assert "deploy_windows.fz-stg" in str(caught.value)


def test_the_clock_setting() -> None:
    assert parse_clock("2026-12-24T10:00:00+09:00") == FROZEN
    assert clock_now("2026-12-24T10:00:00+09:00") == FROZEN
    assert abs(clock_now("") - datetime.now(UTC)) < timedelta(seconds=5)
    with pytest.raises(ValueError, match="no UTC offset"):
        parse_clock("2026-12-24T10:00:00")
    with pytest.raises(ValueError, match="not an ISO 8601"):
        parse_clock("Christmas")


def test_a_worker_never_takes_a_fixed_clock(tmp_path: Path) -> None:
    """On a host whose trust file names the configuration (a worker's), ELICE_CLOCK is
    refused; on a person's machine it is the drill's clock."""
    worker = trust_file_for(tmp_path, tmp_path / "repo.git", config="config/pipeline.yaml")
    clock = "2026-12-24T10:00:00+09:00"
    with pytest.raises(ConfigError, match="drills and tests only"):
        deploy_clock(Settings(clock=clock, trust_file=worker))
    assert deploy_clock(Settings(clock=clock)) == clock
    assert deploy_clock(Settings()) == ""


# --- signed overrides, judged -------------------------------------------------------------


@dataclass(frozen=True)
class Signers:
    people: Approvers
    policy: ApprovalPolicy
    store: LocalFileSystem

    def override(self, who: str, release: str = "r1", **kw: Any) -> dict[str, str]:
        kw.setdefault("reason", "payment outage fix")
        kw.setdefault("signed_at", FROZEN - timedelta(minutes=10))
        env = kw.pop("environment", "fz-stg")
        return sign_override(env, release, signer=who, key=self.people.keys[who], **kw)

    def check(self, overrides: list[dict[str, str]] | None, run_id: str = "run-1") -> Any:
        return check_deploy_window.fn(
            self.policy, "fz-stg", FROZEN, overrides, lambda: "r1", (self.store, run_id)
        )


@pytest.fixture(scope="module")
def signers(tmp_path_factory: pytest.TempPathFactory) -> Signers:
    folder = tmp_path_factory.mktemp("signers")
    people = Approvers(folder, ["alice", "bob", "carol", "mallory"])
    policy = ApprovalPolicy(
        allowed_signers=people.allowed_signers,
        deploy_windows={"fz-stg": windows()},
    )
    return Signers(people, policy, LocalFileSystem(basepath=str(folder / "ledger")))


def test_frozen_without_an_override_is_refused_and_audited(signers: Signers) -> None:
    with pytest.raises(PromotionRefused) as caught:
        signers.check(None, "run-none")
    message = str(caught.value)
    assert "fz-stg is frozen at 2026-12-24 01:00 UTC: 'year-end freeze'" in message
    assert "nothing changed. no override given" in message
    assert "Two of alice, bob, carol may sign an override" in message
    entries = [e for e in read_audit(signers.store, "fz-stg") if e.run_id == "run-none"]
    assert [e.kind for e in entries] == ["frozen"]
    assert entries[0].detail == message


def test_an_open_environment_needs_nothing(signers: Signers) -> None:
    open_at = parse_clock("2026-12-28T12:00:00+09:00")
    done = check_deploy_window.fn(
        signers.policy, "fz-stg", open_at, None, lambda: "r1", (signers.store, "run-open")
    )
    assert done is None
    assert not [e for e in read_audit(signers.store, "fz-stg") if e.run_id == "run-open"]


@pytest.mark.parametrize(
    ("who", "kw", "why"),
    [
        (["alice"], {}, "2 distinct approvers must sign it (valid: alice)"),
        (["alice", "alice"], {}, "(valid: alice)"),
        (["alice", "mallory"], {}, "(valid: alice)"),
        (["alice", "bob"], {"release": "r2"}, "(valid: none)"),
        (["alice", "bob"], {"environment": "fz-dev"}, "(valid: none)"),
        (["alice", "bob"], {"signed_at": FROZEN - timedelta(days=2)}, "(valid: none)"),
    ],
    ids=["one", "same-twice", "not-an-approver", "other-release", "other-env", "stale"],
)
def test_an_override_short_of_two_valid_approvers_is_refused(
    signers: Signers, who: list[str], kw: dict[str, Any], why: str
) -> None:
    run_id = f"run-{'-'.join(who)}-{sorted(kw)}"
    overrides = [signers.override(name, **kw) for name in who]
    with pytest.raises(PromotionRefused, match="frozen") as caught:
        signers.check(overrides, run_id)
    assert why in str(caught.value)
    entries = [e for e in read_audit(signers.store, "fz-stg") if e.run_id == run_id]
    assert entries[-1].kind == "frozen"
    assert all(e.release_id == "r1" for e in entries)


def test_a_forged_signature_is_refused_and_names_the_claim(signers: Signers) -> None:
    forged = signers.override("mallory")
    forged["statement"] = forged["statement"].replace("mallory", "bob")
    with pytest.raises(PromotionRefused):
        signers.check([signers.override("alice"), forged], "run-forged")
    refused = [
        e
        for e in read_audit(signers.store, "fz-stg")
        if e.run_id == "run-forged" and e.kind == "refused"
    ]
    assert [e.who for e in refused] == ["bob"]
    assert "belongs to mallory" in refused[0].detail


def test_two_reasons_are_not_one_override(signers: Signers) -> None:
    overrides = [signers.override("alice"), signers.override("bob", reason="another reason")]
    with pytest.raises(PromotionRefused, match="different reasons"):
        signers.check(overrides, "run-reasons")


def test_two_approvers_override_the_freeze_and_both_are_audited(signers: Signers) -> None:
    freeze, release = signers.check(
        [signers.override("alice"), signers.override("carol")], "run-ok"
    )
    assert (freeze.reason, release) == ("year-end freeze", "r1")
    entries = [e for e in read_audit(signers.store, "fz-stg") if e.run_id == "run-ok"]
    assert [(e.kind, e.who) for e in entries] == [
        ("freeze_override", "alice"),
        ("freeze_override", "carol"),
    ]
    assert all(
        e.detail == "payment outage fix" and e.proof.startswith("ssh-key SHA256:") for e in entries
    )
    assert all(e.signature.startswith("-----BEGIN SSH SIGNATURE-----") for e in entries)


# --- a promotion into a frozen environment, end to end ------------------------------------

DEV, STG = "fz-dev", "fz-stg"


@dataclass(frozen=True)
class Chain:
    cfg: PipelineConfig
    cfg_path: str
    people: Approvers
    d1: ImageRef
    d2: ImageRef


@pytest.fixture(scope="module")
def chain(
    tmp_path_factory: pytest.TempPathFactory,
    stack: StackInfo,
    docker_client: docker.DockerClient,
    pushed_image: ImageRef,
) -> Iterator[Chain]:
    """fz-stg serves D1 and freezes over Christmas; fz-dev holds a verified D2; the run's
    clock (ELICE_CLOCK) is 2026-12-24 10:00 in Seoul."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DOCKER_HOST", stack.docker_host)
    mp.setenv("ELICE_CLOCK", "2026-12-24T10:00:00+09:00")
    folder = tmp_path_factory.mktemp("freeze")
    cfg_path = write_chain_config(folder / "pipeline.yaml", [(DEV, 29100), (STG, 29600)])
    people = Approvers(folder, ["alice", "bob", "carol"])
    people.set_policy({}, deploy_windows={STG: WINDOWS})
    pin_repository(mp, folder, people.bare, environments=(DEV, STG))
    cfg = load_config(cfg_path)
    remove_containers(docker_client, [DEV, STG])
    d2 = derive(docker_client, pushed_image, "frozen")
    for service in SERVICES:
        put_verified(cfg, STG, service, pushed_image)
        put_verified(cfg, DEV, service, d2)
    yield Chain(cfg, cfg_path, people, pushed_image, d2)
    remove_containers(docker_client, [DEV, STG])
    mp.undo()


def _live(c: Chain) -> dict[str, str | None]:
    deployer = DockerDeployer()
    found = {s: deployer.live(c.cfg.environment(STG), c.cfg.service(s)) for s in SERVICES}
    return {s: live.image.digest if live else None for s, live in found.items()}


def test_a_promotion_into_a_frozen_environment_is_refused_then_overridden(chain: Chain) -> None:
    """Refused before anything changes (no intent, no image copied, nothing deployed) and
    audited; with two approvers' signed overrides of that release it ships, both audited."""
    before = current_ledger().current(STG)
    state = promote(environment=STG, config_source=chain.cfg_path, return_state=True)
    error = state.result(raise_on_failure=False)
    assert isinstance(error, PromotionRefused), error
    assert "fz-stg is frozen at 2026-12-24 01:00 UTC: 'year-end freeze'" in str(error)
    assert current_ledger().current(STG).revision == before.revision
    assert _live(chain) == dict.fromkeys(SERVICES, chain.d1.digest)
    store = ledger_filesystem(Settings.from_environ())
    run_id = str(state.state_details.flow_run_id)
    assert [e.kind for e in read_audit(store, STG) if e.run_id == run_id] == ["frozen"]

    release = promote(environment=STG, config_source=chain.cfg_path, dry_run=True).plan.release_id
    overrides = [
        sign_override(STG, release, "security fix", who, chain.people.keys[who], FROZEN)
        for who in ("alice", "bob")
    ]
    outcome = promote(
        environment=STG,
        config_source=chain.cfg_path,
        freeze_override=overrides,
        health_deadline_s=30,
    )
    assert outcome.plan.release_id == release
    assert _live(chain) == dict.fromkeys(SERVICES, chain.d2.digest)
    recorded = current_ledger().current(STG)
    assert {r.release_id for r in recorded.services.values()} == {release}
    entries = [e for e in read_audit(store, STG) if e.release_id == release]
    assert [(e.kind, e.who, e.detail) for e in entries] == [
        ("freeze_override", "alice", "security fix"),
        ("freeze_override", "bob", "security fix"),
    ]


def test_the_release_deployed_must_be_the_one_overridden() -> None:
    freeze = frozen_at(windows(), FROZEN)
    assert freeze is not None
    require_overridden(None, "anything")  # open: nothing to match
    require_overridden((freeze, "r1"), "r1")
    with pytest.raises(PromotionRefused, match="overridden for release r1, but release r2"):
        require_overridden((freeze, "r1"), "r2")

"""The promotion flow end to end: real engine, registry, Prefect server and receivers.

Own environments (pr-dev -> pr-stg -> pr-prod on loopback ports 11xxx-13xxx) and two
services (`course`, and `course-b` running the same image on another port), so nothing
here touches the real dev/staging/production containers. The tests run in file order
and build on each other's releases (module-scoped state), like a release train:

    D1 = the session's pushed image; D2, D3 = images derived from it (one LABEL more).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import docker
import httpx
import pytest
import yaml
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelling, Pending, Running, Scheduled
from pydantic import SecretStr

from blocks.config import PipelineConfig, load_config
from blocks.notifications import PAGERDUTY_BLOCK, SLACK_BLOCK, PagerDutyService, SlackChannel
from blocks.registry import OciRegistry
from blocks.stack import StackInfo
from blocks.storage import STORAGE_BLOCK, ReleaseStorage, ledger_filesystem
from core.errors import PromotionError, PromotionRefused, PromotionRejected, PromotionRolledBack
from core.records import ImageRef
from core.settings import Settings
from daemons.slack_receiver import ACTIONS_PATH, SlackReceiver
from flows.promotion import promote, rollback
from tasks.approval import (
    SLACK_SECRET_BLOCK,
    answer_for,
    read_gate,
    resume_from_slack,
    submit_answer,
)
from tasks.audit import AuditEntry, read_audit
from tasks.deploy.docker import DockerDeployer
from tasks.health import probe_health
from tasks.images import REGISTRY_BLOCK
from tasks.slack_actions import APPROVE_ACTION
from tests.approvers import Approvers, paused_promotion
from tests.flows.chain import derive, put_release, remove_containers
from tests.ledgers import current_ledger
from tests.plugins.receivers import Receiver
from tests.runs import finished, task_runs_of
from tests.slack_requests import button_press, slack_signed
from tests.trust import SavedRepository, pin_repository

pytestmark = pytest.mark.stack

DEV, STG, PROD = "pr-dev", "pr-stg", "pr-prod"
SERVICES = ["course", "course-b"]
APPROVERS = ["alice", "bob", "carol"]
SLACK_TOKEN = "xoxb-test-0000-SECRET-slack-token"
PD_KEY = "pd-routing-SECRET-key-0123456789"
PREFIX = "elice"
GATE = {PROD: {"approvers": APPROVERS, "approvals_required": 1, "timeout_s": 120}}


def write_config(path: Path) -> str:
    """A pipeline config with only this module's environments and services."""
    data = {
        "services": [
            {"name": "course", "port": 8004, "libs": ["servicekit"]},
            {"name": "course-b", "port": 8005, "libs": ["servicekit"]},
        ],
        "libs": [{"name": "servicekit", "libs": []}],
        "environments": [
            {
                "name": DEV,
                "namespace": "pr-dev",
                "replicas": {"min": 1, "max": 1},
                "log_level": "INFO",
                "storage": "minio",
                "local_port_offset": 3100,
            },
            {
                "name": STG,
                "namespace": "pr-stg",
                "replicas": {"min": 1, "max": 1},
                "log_level": "INFO",
                "storage": "minio",
                "promotes_from": DEV,
                "local_port_offset": 4100,
            },
            {
                "name": PROD,
                "namespace": "pr-prod",
                "replicas": {"min": 1, "max": 1},
                "log_level": "WARN",
                "storage": "s3",
                "promotes_from": STG,
                "local_port_offset": 5100,
            },
        ],
        # a small probe keeps the 2000 ms latency drill short; the slack is the noise floor
        # of two busy cores (a host stall of 520 ms once failed a healthy release at 500 ms)
        "performance": {"requests": 8, "concurrency": 4, "min_p95_slack_ms": 1500},
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


class Train:
    """What the module's tests share."""

    def __init__(self, cfg_path: str, approvers: Approvers, cfg: PipelineConfig) -> None:
        self.cfg_path = cfg_path
        self.approvers = approvers
        self.cfg = cfg
        self.digests: dict[str, ImageRef] = {}
        self.run_ids: list[UUID] = []


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    """Slack and PagerDuty receivers, saved as the blocks the flow's hooks load."""
    rec = Receiver().start()
    SlackChannel(
        bot_token=SecretStr(SLACK_TOKEN), channel="#releases", base_url=rec.slack_base_url
    ).save(SLACK_BLOCK, overwrite=True)
    PagerDutyService(routing_key=SecretStr(PD_KEY), events_url=rec.pagerduty_url).save(
        PAGERDUTY_BLOCK, overwrite=True
    )
    yield rec
    with get_client(sync_client=True) as client:
        for slug, name in (
            ("elice-slack-channel", SLACK_BLOCK),
            ("elice-pagerduty-service", PAGERDUTY_BLOCK),
        ):
            document = client.read_block_document_by_name(name, slug)
            client.delete_block_document(document.id)
    rec.stop()


@pytest.fixture(scope="module")
def train(
    tmp_path_factory: pytest.TempPathFactory,
    stack: StackInfo,
    docker_client: docker.DockerClient,
    pushed_image: ImageRef,
    receiver: Receiver,
) -> Iterator[Train]:
    """Releases D1..D3, and D1 of both services deployed and verified in pr-dev."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DOCKER_HOST", stack.docker_host)
    folder = tmp_path_factory.mktemp("promotion")
    cfg_path = write_config(folder / "pipeline.yaml")
    people = Approvers(folder, [*APPROVERS, "mallory"])  # mallory has a key, approves nothing
    people.set_policy(GATE)
    pin_repository(mp, folder, people.bare, environments=(DEV, STG, PROD))
    t = Train(cfg_path, people, load_config(cfg_path))
    remove_containers(docker_client, [DEV, STG, PROD])
    t.digests = {
        "D1": pushed_image,
        "D2": derive(docker_client, pushed_image, "two"),
        "D3": derive(docker_client, pushed_image, "three"),
    }
    for service in SERVICES:
        put_dev(t, service, t.digests["D1"])
    yield t
    remove_containers(docker_client, [DEV, STG, PROD])
    mp.undo()


def put_dev(t: Train, service: str, image: ImageRef, *, verified: bool = True) -> None:
    """What CI does for dev: deploy the image and record it (verified or not)."""
    release = f"ci-{image.short}"
    put_release(DockerDeployer(), t.cfg, DEV, service, image, release_id=release, verified=verified)


def serving(t: Train, env: str) -> dict[str, str | None]:
    """The digest each service's /version reports in `env` (None: not healthy)."""
    deployer = DockerDeployer()
    spec = t.cfg.environment(env)
    out: dict[str, str | None] = {}
    for name in SERVICES:
        svc = t.cfg.service(name)
        address = deployer.address(spec, svc)
        healthy = probe_health(address, svc, deadline_s=5).ok
        out[name] = (
            httpx.get(f"{address}/version", timeout=10).json()["digest"] if healthy else None
        )
    return out


def run(t: Train, environment: str, **kwargs: Any) -> Any:
    """Run the promote flow in this thread; returns its final state."""
    kwargs.setdefault("config_source", t.cfg_path)
    kwargs.setdefault("health_deadline_s", 20)
    if environment == PROD and "request" not in kwargs and not kwargs.get("dry_run"):
        kwargs |= t.approvers.request(PROD, kwargs["promoted_by"], kwargs.get("services"))
    state = promote(environment=environment, return_state=True, **kwargs)
    t.run_ids.append(UUID(str(state.state_details.flow_run_id)))
    return state


class Background:
    """A promote flow running in a thread (it pauses at the gate)."""

    def __init__(self, t: Train, environment: str, **kwargs: Any) -> None:
        self._states: queue.Queue[Any] = queue.Queue()
        self.started = time.monotonic()
        self._thread = threading.Thread(
            target=lambda: self._states.put(run(t, environment, **kwargs)), daemon=True
        )
        self._thread.start()

    def final(self, timeout: float = 240) -> Any:
        return self._states.get(timeout=timeout)


def approve_in_background(t: Train, approver: str = "bob", **kwargs: Any) -> Any:
    """Promote to production and approve at the gate; returns the final state."""
    before = set(t.run_ids)
    job = Background(t, PROD, promoted_by="alice", **kwargs)
    run_id = paused_promotion(before)
    submit_answer(run_id, t.approvers.answer(run_id, approver))
    return job.final()


def events(receiver: Receiver, action: str) -> list[dict[str, Any]]:
    return [r.json for r in receiver.requests_to("/v2/enqueue") if r.json["event_action"] == action]


def slack_texts(receiver: Receiver) -> list[str]:
    return [str(r.payload().get("text", "")) for r in receiver.requests_to("chat.postMessage")]


def wait_for(probe: Any, timeout: float = 15) -> Any:
    """The first truthy value `probe()` returns within `timeout` seconds."""
    end = time.monotonic() + timeout
    while not (value := probe()):
        if time.monotonic() > end:
            pytest.fail("condition not met in time")
        time.sleep(0.2)
    return value


def wait_until(check: Any, timeout: float = 15) -> None:
    wait_for(check, timeout)


# --- the train ---------------------------------------------------------------------------


def test_staging_promotion_of_a_dev_verified_release(train: Train, receiver: Receiver) -> None:
    d1 = train.digests["D1"].digest
    started = time.monotonic()
    state = run(train, STG, services=None, promoted_by="ci")
    seconds = time.monotonic() - started
    assert state.is_completed(), state.message
    outcome = state.result()
    assert outcome.deployed == SERVICES
    assert outcome.approved_by is None
    assert serving(train, STG) == {"course": d1, "course-b": d1}
    current = current_ledger().current(STG)
    for name in SERVICES:
        record = current.services[name]
        assert record.verified
        assert record.image.digest == d1
        assert record.release_id == outcome.plan.release_id
        assert record.scan == "clean"
        assert record.baseline is not None
        assert record.baseline["p95_ms"] > 0
    wait_until(lambda: any("Deployed: pr-stg" in text for text in slack_texts(receiver)))
    assert events(receiver, "trigger") == []  # staging is not paged
    print(f"staging promotion of 2 services: {seconds:.1f}s")


def test_unverified_release_is_refused_and_nothing_deploys(train: Train) -> None:
    put_dev(train, "course", train.digests["D2"], verified=False)
    revision = current_ledger().current(STG).revision
    state = run(train, STG, services=["course"], promoted_by="ci")
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, PromotionRefused)
    assert "course: release ci-" in str(error)
    assert "is not verified in pr-dev" in str(error)
    assert current_ledger().current(STG).revision == revision
    d1 = train.digests["D1"].digest
    assert serving(train, STG) == {"course": d1, "course-b": d1}


def test_dry_run_plans_and_changes_nothing(train: Train) -> None:
    current_ledger().mark_verified(DEV, "course", None)
    put_dev(train, "course-b", train.digests["D3"])
    revision = current_ledger().current(STG).revision
    state = run(train, STG, promoted_by="ci", dry_run=True)
    assert state.is_completed()
    plan = state.result().plan
    assert [c.new_digest for c in plan.changes] == [
        train.digests["D2"].digest,
        train.digests["D3"].digest,
    ]
    assert [c.current_digest for c in plan.changes] == [train.digests["D1"].digest] * 2
    assert current_ledger().current(STG).revision == revision


def audit_of(run_id: UUID) -> list[AuditEntry]:
    store = ledger_filesystem(Settings.from_environ())
    return [e for e in read_audit(store, PROD) if e.run_id == str(run_id)]


def answered(run_id: UUID, run_input: dict[str, str]) -> AuditEntry:
    """Send `run_input`; the gate's audit entry for it, once the run waits again or ends."""
    seen = len(audit_of(run_id))
    submit_answer(run_id, run_input)
    wait_until(lambda: len(audit_of(run_id)) > seen, 60)
    return audit_of(run_id)[-1]


def test_production_gate_refuses_unproven_answers_then_deploys(
    train: Train, receiver: Receiver
) -> None:
    before = set(train.run_ids)
    job = Background(train, PROD, promoted_by="alice")
    run_id = paused_promotion(before)
    gate = read_gate(run_id)
    assert gate.environment == PROD
    assert train.digests["D1"].digest in gate.description
    assert "Needs 1 signed approval" in gate.description
    good = train.approvers.answer(run_id, "bob")
    tampered = json.loads(good["statement"])
    tampered["digests"]["course"] = train.digests["D3"].digest
    bob_as_carol, _, _ = answer_for(run_id, train.approvers.keys["bob"], "carol", "approve")
    attacks = {
        "no signature": ({**good, "signature": "garbage"}, "bob"),
        "a key that approves nothing": (train.approvers.answer(run_id, "mallory"), "mallory"),
        "the promoter": (train.approvers.answer(run_id, "alice"), "alice"),
        "bob's signature on other digests": (
            {"statement": json.dumps(tampered), "signature": good["signature"]},
            "bob",
        ),
        "bob's key claiming carol": (bob_as_carol, "carol"),
    }
    for what, (bad, claimed) in attacks.items():
        entry = answered(run_id, bad)
        assert entry.kind == "refused", (what, entry)
        assert entry.who == claimed, (what, entry)
        paused_promotion(before)  # waits again
        assert current_ledger().current(PROD).services == {}, what
    # forced to Running with no answer at all: refused and audited, the run waits again
    seen = len(audit_of(run_id))
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Running(), force=True)
    wait_until(lambda: len(audit_of(run_id)) > seen, 60)
    assert (audit_of(run_id)[-1].kind, audit_of(run_id)[-1].who) == ("refused", "unknown")
    paused_promotion(before)
    # forced to Scheduled, where no answer could reach it: paused again, and audited
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Scheduled(), force=True)
    wait_until(lambda: any("forced to Scheduled" in e.detail for e in audit_of(run_id)), 30)
    assert paused_promotion(before) == run_id
    # a fake plan planted where the form's description lives: the approver's command
    # never reads it, it signs what the ledgers say
    keyset = read_gate_keyset(run_id)
    with get_client(sync_client=True) as client:
        client.delete_flow_run_input(run_id, keyset["description"])
        client.create_flow_run_input(run_id, keyset["description"], '"| course | sha256:fake |"')
    assert "sha256:fake" in read_gate(run_id).description
    _, computed, _ = answer_for(run_id, train.approvers.keys["bob"], "bob", "approve")
    assert [c.new_digest for c in computed.changes] == [train.digests["D1"].digest] * 2
    entry = answered(run_id, good)
    assert (entry.kind, entry.who) == ("approved", "bob")
    assert entry.proof.startswith("ssh-key SHA256:")
    state = job.final()
    assert state.is_completed(), state.message
    assert state.result().approved_by == "bob"
    d1 = train.digests["D1"].digest
    assert serving(train, PROD) == {"course": d1, "course-b": d1}
    record = current_ledger().current(PROD).services["course"]
    assert (record.approved_by, record.promoted_by, record.verified) == ("bob", "alice", True)
    kinds = [e.kind for e in audit_of(run_id)]
    # each attack, the forced resume and the forced Scheduled are refused, then approved
    assert kinds == ["requested", *["refused"] * (len(attacks) + 2), "approved"]
    wait_until(lambda: len(events(receiver, "resolve")) >= 1)


def read_gate_keyset(run_id: UUID) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
    assert state is not None
    assert state.state_details.run_input_keyset
    return dict(state.state_details.run_input_keyset)


def test_a_caller_cannot_bring_an_approval_policy(train: Train, tmp_path: Path) -> None:
    data = yaml.safe_load(Path(train.cfg_path).read_text(encoding="utf-8"))
    data["environments"][2]["approval_required"] = False  # the attack: no gate for me
    own = tmp_path / "mine.yaml"
    own.write_text(yaml.safe_dump(data), encoding="utf-8")
    revision = current_ledger().current(PROD).revision
    state = run(train, PROD, promoted_by="alice", config_source=str(own))
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, PromotionRefused), error
    assert "approval policy is not part of the pipeline configuration" in str(error)
    assert current_ledger().current(PROD).revision == revision


def test_blocks_saved_through_the_api_decide_nothing(train: Train, tmp_path: Path) -> None:
    """What anyone reaching the API can save: a repository block whose `main` makes mallory
    production's approver (with the key mallory holds), a storage block, a registry block
    at another address. None of them changes who may approve or where images go; once
    the registry block is gone, a real signed approval still ships."""
    if not current_ledger().current(STG).services:  # run alone: staging has a release first
        assert run(train, STG, promoted_by="ci").is_completed()
    (tmp_path / "evil").mkdir()
    evil = Approvers(tmp_path / "evil", [])
    evil.allowed_signers = train.approvers.allowed_signers
    evil.set_policy({PROD: {"approvers": ["mallory"], "timeout_s": 120}})
    SavedRepository(url=str(evil.bare), name="elice/monorepo").save(
        "elice-repository", overwrite=True
    )
    ReleaseStorage(kind="local", path=str(tmp_path / "planted")).save(STORAGE_BLOCK, overwrite=True)
    OciRegistry(address="127.0.0.1:1", insecure=True).save(REGISTRY_BLOCK, overwrite=True)
    revision = current_ledger().current(PROD).revision
    try:
        state = run(train, PROD, promoted_by="alice")
        assert state.is_failed()
        error = state.result(raise_on_failure=False)
        assert isinstance(error, PromotionRefused), error
        assert "registry block 'elice-registry' is not pinned in the trust file" in str(error)
        assert current_ledger().current(PROD).revision == revision
        OciRegistry.delete(REGISTRY_BLOCK)
        before = set(train.run_ids)
        job = Background(train, PROD, promoted_by="alice")
        run_id = paused_promotion(before)
        entry = answered(run_id, train.approvers.answer(run_id, "mallory"))
        assert (entry.kind, entry.who) == ("refused", "mallory"), entry
        assert current_ledger().current(PROD).revision == revision
        entry = answered(run_id, train.approvers.answer(run_id, "bob"))
        assert (entry.kind, entry.who) == ("approved", "bob"), entry
        state = job.final()
        assert state.is_completed(), state.message
        assert state.result().approved_by == "bob"
        assert current_ledger().current(PROD).revision > revision
        assert not (tmp_path / "planted" / "ledger").exists()  # the storage block: unread
    finally:
        for kind, name in (
            (SavedRepository, "elice-repository"),
            (ReleaseStorage, STORAGE_BLOCK),
            (OciRegistry, REGISTRY_BLOCK),
        ):
            with contextlib.suppress(ValueError, ObjectNotFound):
                kind.delete(name)


def test_an_unsigned_production_request_is_refused(train: Train) -> None:
    revision = current_ledger().current(PROD).revision
    state = run(train, PROD, promoted_by="alice", request=None)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, PromotionRefused), error
    assert "must be known by key" in str(error)
    assert current_ledger().current(PROD).revision == revision


def test_staging_update_then_production_rejection_deploys_nothing(train: Train) -> None:
    state = run(train, STG, promoted_by="ci")
    assert state.is_completed(), state.message
    d2, d3 = train.digests["D2"].digest, train.digests["D3"].digest
    assert serving(train, STG) == {"course": d2, "course-b": d3}
    previous = current_ledger().current(STG).previous["course"]
    assert previous.image.digest == train.digests["D1"].digest

    revision = current_ledger().current(PROD).revision
    before = set(train.run_ids)
    job = Background(train, PROD, promoted_by="alice")
    run_id = paused_promotion(before)
    # forced to Scheduled (or Pending) through the API, it would wait where no answer
    # reaches it: the gate puts it back to Paused, says so in the audit trail, and the
    # rejection still ends it
    for forced in (Scheduled(), Pending()):
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run_id, forced, force=True)
        note = f"forced to {forced.name} from outside; paused again"
        wait_until(lambda note=note: any(note in e.detail for e in audit_of(run_id)), 30)
        assert paused_promotion(before) == run_id
    submit_answer(run_id, train.approvers.answer(run_id, "carol", "reject", "load test pending"))
    final = job.final()
    assert final.is_failed()
    error = final.result(raise_on_failure=False)
    assert isinstance(error, PromotionRejected)
    assert "carol rejected" in str(error)
    assert "load test pending" in str(error)
    assert current_ledger().current(PROD).revision == revision
    d1 = train.digests["D1"].digest
    assert serving(train, PROD) == {"course": d1, "course-b": d1}


def test_a_waiting_promotion_cancelled_from_outside_deploys_nothing(train: Train) -> None:
    revision = current_ledger().current(PROD).revision
    before = set(train.run_ids)
    job = Background(train, PROD, promoted_by="alice")
    run_id = paused_promotion(before)
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Cancelling(), force=True)
    final = job.final()
    assert not final.is_completed()
    entry = audit_of(run_id)[-1]
    assert entry.kind == "refused"
    assert "set to Cancelling from outside" in entry.detail
    assert "nothing deployed" in entry.detail
    assert current_ledger().current(PROD).revision == revision
    d1 = train.digests["D1"].digest
    assert serving(train, PROD) == {"course": d1, "course-b": d1}


def test_approval_timeout_deploys_nothing(train: Train, receiver: Receiver) -> None:
    revision = current_ledger().current(PROD).revision
    started = time.monotonic()
    train.approvers.set_policy({PROD: {"approvers": APPROVERS, "timeout_s": 3}})
    try:
        state = run(train, PROD, promoted_by="alice")
    finally:
        train.approvers.set_policy(GATE)
    assert state.is_failed()
    # the server fails an expired pause itself; the flow's reason is in its log and notice
    assert "never resumed" in state.message
    run_id = state.state_details.flow_run_id
    reason = "within 3s; nothing deployed"
    wait_until(lambda: any("nobody approved release" in m and reason in m for m in logs_of(run_id)))
    wait_until(lambda: any("nobody approved in time" in t for t in slack_texts(receiver)))
    assert time.monotonic() - started < 60
    assert current_ledger().current(PROD).revision == revision
    d1 = train.digests["D1"].digest
    assert serving(train, PROD) == {"course": d1, "course-b": d1}


@pytest.mark.parametrize(
    ("drill", "failure"),
    [
        ({"FAULT_HEALTH": "1"}, "failed its health check"),
        ({"FAULT_LATENCY_MS": "2000"}, "performance regression"),
    ],
    ids=["broken-health", "slow-2000ms"],
)
def test_failed_release_rolls_back_every_service(
    train: Train, receiver: Receiver, drill: dict[str, str], failure: str
) -> None:
    d1, d3 = train.digests["D1"].digest, train.digests["D3"].digest
    triggers = len(events(receiver, "trigger"))
    recorded = current_ledger().current(PROD)
    state = approve_in_background(train, drill_env={d3: drill})
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, PromotionRolledBack), error
    assert failure in error.failed
    assert "course-b" in error.failed
    assert error.restored == {"course": d1, "course-b": d1}
    # course (D2) deployed fine and was rolled back with course-b: both serve D1 again
    assert serving(train, PROD) == {"course": d1, "course-b": d1}
    after = current_ledger().current(PROD)
    # the attempt is on record (begun, rolled back); what serves is recorded unchanged
    assert after.revision == recorded.revision + 2
    assert after.in_progress is None
    assert after.change.startswith("release ")
    assert "rolled back" in after.change
    assert after.services == recorded.services
    wait_until(lambda: len(events(receiver, "trigger")) == triggers + 1)
    trigger = events(receiver, "trigger")[-1]
    assert trigger["dedup_key"] == f"elice-devops-{PROD}"
    assert trigger["payload"]["class"] == "rolled_back"


SLACK_SIGNING = "8f1e2d3c4b5a69788796a5b4c3d2e1f0-signing"
SLACK_USERS = {"U0CAROL01": "carol", "U0ALICE01": "alice"}


def slack_press(
    value: str, user_id: str, secret: str = SLACK_SIGNING
) -> tuple[bytes, dict[str, str]]:
    """The request Slack sends when `user_id` presses Approve, signed as Slack documents."""
    body = button_press(APPROVE_ACTION, user_id, value)
    return body, slack_signed(body, secret)


@pytest.fixture(scope="module")
def slack_receiver(train: Train) -> Iterator[SlackReceiver]:
    """The Slack receiver, connected to the gate, and the gate's copy of the secret."""
    Secret(value=SLACK_SIGNING).save(SLACK_SECRET_BLOCK, overwrite=True)
    train.approvers.set_policy(GATE, slack_users=SLACK_USERS)
    context = contextvars.copy_context()  # the receiver's threads talk to this server
    rec = SlackReceiver(
        SecretStr(SLACK_SIGNING),
        SLACK_USERS,
        lambda decision, approver: context.run(resume_from_slack, decision, approver),
    ).start()
    yield rec
    rec.stop()
    train.approvers.set_policy(GATE)
    Secret.delete(SLACK_SECRET_BLOCK)


def approve_button(receiver: Receiver, run_id: UUID) -> str:
    """The Approve button's value in the approval_needed message about `run_id`."""

    def found() -> str | None:
        for request in receiver.requests_to("chat.postMessage"):
            blocks = request.payload().get("blocks") or []
            if isinstance(blocks, str):
                blocks = json.loads(blocks)
            for block in blocks:
                for element in block.get("elements", []):
                    if element.get("action_id") == APPROVE_ACTION and str(run_id) in str(
                        element.get("value")
                    ):
                        return str(element["value"])
        return None

    return str(wait_for(found, 30))


def test_good_release_approved_in_slack_deploys_and_resolves_the_incident(
    train: Train, receiver: Receiver, slack_receiver: SlackReceiver
) -> None:
    resolves = len(events(receiver, "resolve"))
    before = set(train.run_ids)
    job = Background(train, PROD, promoted_by="alice")
    run_id = paused_promotion(before)
    value = approve_button(receiver, run_id)  # the message carried the buttons
    url = f"{slack_receiver.url}{ACTIONS_PATH}"
    forged_body, forged_headers = slack_press(value, "U0CAROL01", secret="not-the-secret")
    assert httpx.post(url, content=forged_body, headers=forged_headers).status_code == 401
    body, headers = slack_press(value, "U0MALLORY")
    assert httpx.post(url, content=body, headers=headers).status_code == 403
    body, headers = slack_press(value, "U0ALICE01")  # mapped, but the promoter
    assert httpx.post(url, content=body, headers=headers).status_code == 200
    wait_until(lambda: audit_of(run_id)[-1].kind == "refused", 60)
    assert "own promotion" in audit_of(run_id)[-1].detail
    # a press planted straight into the run's input, with a made-up signature
    paused_promotion(before)
    planted = {
        "slack_timestamp": headers["X-Slack-Request-Timestamp"],
        "slack_body": body.decode(),
        "slack_signature": "v0=" + "0" * 64,
    }
    assert answered(run_id, planted).kind == "refused"
    paused_promotion(before)
    body, headers = slack_press(value, "U0CAROL01")
    answer = httpx.post(url, content=body, headers=headers)
    assert answer.status_code == 200, answer.text
    state = job.final()
    assert state.is_completed(), state.message
    assert state.result().approved_by == "carol"
    approved = audit_of(run_id)[-1]
    assert (approved.kind, approved.who, approved.proof) == ("approved", "carol", "slack U0CAROL01")
    d2, d3 = train.digests["D2"].digest, train.digests["D3"].digest
    assert serving(train, PROD) == {"course": d2, "course-b": d3}
    wait_until(lambda: len(events(receiver, "resolve")) == resolves + 1)
    assert events(receiver, "resolve")[-1]["dedup_key"] == f"elice-devops-{PROD}"


def test_rollback_flow_returns_to_the_previous_release(train: Train) -> None:
    state = rollback(
        environment=PROD,
        services=["course"],
        requested_by="carol",
        config_source=train.cfg_path,
        return_state=True,
    )
    train.run_ids.append(UUID(str(state.state_details.flow_run_id)))
    assert state.is_completed(), state.message
    d1, d3 = train.digests["D1"].digest, train.digests["D3"].digest
    assert state.result() == {"course": d1}
    assert serving(train, PROD) == {"course": d1, "course-b": d3}
    assert current_ledger().current(PROD).services["course"].image.digest == d1
    again = rollback(
        environment=PROD,
        services=["course"],
        config_source=train.cfg_path,
        return_state=True,
    )
    assert again.is_failed()
    assert "keeps no previous release" in str(again.result(raise_on_failure=False))


def logs_of(run_id: UUID) -> list[str]:
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return [log.message for log in logs]


def test_two_promotions_waiting_at_their_gates_cannot_both_deploy(train: Train) -> None:
    before = set(train.run_ids)
    first = Background(train, PROD, promoted_by="alice")
    first_id = paused_promotion(before)
    # Waiting for a person holds no lock: the second promotion reaches its gate too.
    second = Background(train, PROD, promoted_by="alice")
    second_id = paused_promotion(before | {first_id})
    approval = train.approvers.answer(second_id, "carol")  # signed while both wait
    submit_answer(first_id, train.approvers.answer(first_id, "bob"))
    assert first.final().is_completed()
    revision = current_ledger().current(PROD).revision
    submit_answer(second_id, approval)
    final = second.final()
    assert final.is_failed()
    error = final.result(raise_on_failure=False)
    assert isinstance(error, PromotionRefused), error
    assert "changed while release" in str(error)
    assert "nothing deployed" in str(error)
    # the second approval moved nothing: what the first deployed, and who approved it, stay
    assert current_ledger().current(PROD).revision == revision
    record = current_ledger().current(PROD).services["course"]
    assert record.approved_by == "bob"
    assert record.image.digest == train.digests["D2"].digest
    assert serving(train, PROD)["course"] == train.digests["D2"].digest

    tasks = task_runs_of([first_id, second_id], finished("begin_deploys"))
    began = {t.flow_run_id for t in tasks if t.name.startswith("begin_deploys")}
    assert began == {first_id}, "the refused promotion began deploying"


def test_two_approvals_take_two_distinct_approvers(train: Train) -> None:
    train.approvers.set_policy(
        {PROD: {"approvers": APPROVERS, "approvals_required": 2, "timeout_s": 120}}
    )
    try:
        before = set(train.run_ids)
        job = Background(train, PROD, promoted_by="alice")
        run_id = paused_promotion(before)
        assert "Needs 2 signed approval" in read_gate(run_id).description
        assert answered(run_id, train.approvers.answer(run_id, "bob")).kind == "approved"
        paused_promotion(before)  # one is not enough: it waits for the second
        again = answered(run_id, train.approvers.answer(run_id, "bob"))
        assert (again.kind, again.who) == ("refused", "bob")
        assert "approved already" in again.detail
        paused_promotion(before)
        assert answered(run_id, train.approvers.answer(run_id, "carol")).kind == "approved"
        state = job.final()
    finally:
        train.approvers.set_policy(GATE)
    assert state.is_completed(), state.message
    assert state.result().approved_by == "bob, carol"
    assert current_ledger().current(PROD).services["course"].approved_by == "bob, carol"


def test_secrets_never_reach_the_logs(train: Train, receiver: Receiver) -> None:
    assert train.run_ids
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=train.run_ids)))
    assert len(logs) > 50
    text = "\n".join(log.message for log in logs)
    assert SLACK_TOKEN not in text
    assert PD_KEY not in text
    # the receivers did get them: the notices were real
    assert any(
        SLACK_TOKEN in r.headers.get("authorization", "")
        for r in receiver.requests_to("chat.postMessage")
    )
    assert all(r.json["routing_key"] == PD_KEY for r in receiver.requests_to("/v2/enqueue"))


def test_promotion_error_hierarchy() -> None:
    assert issubclass(PromotionRefused, PromotionError)
    assert issubclass(PromotionRejected, PromotionError)
    assert issubclass(PromotionRolledBack, PromotionError)

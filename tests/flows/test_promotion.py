"""The promotion flow end to end: real engine, registry, Prefect server and receivers.

Own environments (pr-dev -> pr-stg -> pr-prod on loopback ports 11xxx-13xxx) and two
services (`course`, and `course-b` running the same image on another port), so nothing
here touches the real dev/staging/production containers. The tests run in file order
and build on each other's releases (module-scoped state), like a release train:

    D1 = the session's pushed image; D2, D3 = images derived from it (one LABEL more).
"""

from __future__ import annotations

import io
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
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import StateType
from pydantic import SecretStr

from blocks.config import PipelineConfig, load_config
from blocks.notifications import PAGERDUTY_BLOCK, SLACK_BLOCK, PagerDutyService, SlackChannel
from blocks.stack import StackInfo
from flows.promotion import promote, rollback
from tasks.approval import approval_input, read_gate, submit_answer
from tasks.deploy.docker import DockerDeployer, container_name
from tasks.exceptions import (
    ApprovalRefused,
    PromotionError,
    PromotionRefused,
    PromotionRejected,
    PromotionRolledBack,
)
from tasks.health import probe_health
from tasks.models import ImageRef
from tasks.registry import manifest_digest
from tasks.releases import Ledger, ReleaseRecord
from tests.plugins.receivers import Receiver

pytestmark = pytest.mark.stack

DEV, STG, PROD = "pr-dev", "pr-stg", "pr-prod"
SERVICES = ["course", "course-b"]
APPROVERS = ["alice", "bob", "carol"]
SLACK_TOKEN = "xoxb-test-0000-SECRET-slack-token"
PD_KEY = "pd-routing-SECRET-key-0123456789"
PREFIX = "elice"


def write_config(path: Path, approval_timeout_s: int = 120) -> str:
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
                "approval_required": True,
                "approvers": APPROVERS,
                "approval_timeout_s": approval_timeout_s,
                "local_port_offset": 5100,
            },
        ],
        # a small probe keeps the 1500 ms latency drill short; the noise floor stays
        "performance": {"requests": 8, "concurrency": 4, "min_p95_slack_ms": 500},
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


class Train:
    """What the module's tests share."""

    def __init__(self, cfg_path: str, slow_gate_path: str, cfg: PipelineConfig) -> None:
        self.cfg_path = cfg_path
        self.slow_gate_path = slow_gate_path
        self.cfg = cfg
        self.digests: dict[str, ImageRef] = {}
        self.run_ids: list[UUID] = []


def derive(client: docker.DockerClient, base: ImageRef, variant: str) -> ImageRef:
    """An image FROM `base` with one more label, pushed; same commit label as `base`."""
    source = f"{base.repository}:{base.tag}" if base.tag else base.reference
    dockerfile = f"FROM {source}\nLABEL io.elice.test.variant={variant}\n"
    tag = f"variant-{variant}-{base.short}"
    client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=f"{base.repository}:{tag}")
    for chunk in client.api.push(base.repository, tag=tag, stream=True, decode=True):
        assert "error" not in chunk, chunk
    digest = manifest_digest(base.repository, tag)
    return base.model_copy(update={"digest": digest, "tag": tag})


def as_service(image: ImageRef, service: str) -> ImageRef:
    return image.model_copy(update={"service": service})


def remove_containers(client: docker.DockerClient) -> None:
    for env in (DEV, STG, PROD):
        for service in SERVICES:
            for suffix in ("", "-next"):
                try:
                    client.containers.get(container_name(PREFIX, env, service) + suffix).remove(
                        force=True
                    )
                except docker.errors.NotFound:
                    pass


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
    slow_gate = write_config(folder / "slow-gate.yaml", approval_timeout_s=3)
    t = Train(cfg_path, slow_gate, load_config(cfg_path))
    remove_containers(docker_client)
    t.digests = {
        "D1": pushed_image,
        "D2": derive(docker_client, pushed_image, "two"),
        "D3": derive(docker_client, pushed_image, "three"),
    }
    for service in SERVICES:
        put_dev(t, service, t.digests["D1"])
    yield t
    remove_containers(docker_client)
    mp.undo()


def put_dev(t: Train, service: str, image: ImageRef, *, verified: bool = True) -> None:
    """What CI does for dev: deploy the image and record it (verified or not)."""
    ref = as_service(image, service)
    DockerDeployer().deploy(t.cfg.environment(DEV), t.cfg.service(service), ref, deadline_s=60)
    Ledger().record_deploy(
        DEV,
        ReleaseRecord(
            service=service,
            environment=DEV,
            image=ref,
            release_id=f"ci-{image.short}",
            verified=verified,
            ref="refs/heads/main",
            scan="clean",
        ),
    )


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


def paused_run(not_in: set[UUID], timeout: float = 120) -> UUID:
    """The promote run that is paused at its gate (form saved), not one of `not_in`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["promote"])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
                ),
            )
        for found in runs:
            if found.id not in not_in:
                try:
                    read_gate(found.id)
                except Exception:
                    continue
                return found.id
        time.sleep(0.5)
    pytest.fail("no promote run paused at its gate")


def approve_in_background(t: Train, approver: str = "bob", **kwargs: Any) -> Any:
    """Promote to production and approve at the gate; returns the final state."""
    before = set(t.run_ids)
    job = Background(t, PROD, promoted_by="alice", **kwargs)
    run_id = paused_run(before)
    submit_answer(run_id, approval_input(approver, read_gate(run_id).release_id or ""))
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
    current = Ledger().current(STG)
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
    revision = Ledger().current(STG).revision
    state = run(train, STG, services=["course"], promoted_by="ci")
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, PromotionRefused)
    assert "course: release ci-" in str(error)
    assert "is not verified in pr-dev" in str(error)
    assert Ledger().current(STG).revision == revision
    d1 = train.digests["D1"].digest
    assert serving(train, STG) == {"course": d1, "course-b": d1}


def test_dry_run_plans_and_changes_nothing(train: Train) -> None:
    Ledger().mark_verified(DEV, "course", None)
    put_dev(train, "course-b", train.digests["D3"])
    revision = Ledger().current(STG).revision
    state = run(train, STG, promoted_by="ci", dry_run=True)
    assert state.is_completed()
    plan = state.result().plan
    assert [c.new_digest for c in plan.changes] == [
        train.digests["D2"].digest,
        train.digests["D3"].digest,
    ]
    assert [c.current_digest for c in plan.changes] == [train.digests["D1"].digest] * 2
    assert Ledger().current(STG).revision == revision


def test_production_gate_refuses_bad_approvals_then_deploys(
    train: Train, receiver: Receiver
) -> None:
    before = set(train.run_ids)
    job = Background(train, PROD, promoted_by="alice")
    run_id = paused_run(before)
    gate = read_gate(run_id)
    assert gate.environment == PROD
    assert gate.release_id
    assert train.digests["D1"].digest in gate.description
    for bad in (
        approval_input("mallory", gate.release_id),
        approval_input("alice", gate.release_id),  # the promoter
        approval_input("bob", "0123456789ab"),  # another release
    ):
        with pytest.raises(ApprovalRefused):
            submit_answer(run_id, bad)
        assert read_gate(run_id).release_id == gate.release_id  # still paused
    assert Ledger().current(PROD).services == {}
    submit_answer(run_id, approval_input("bob", gate.release_id))
    state = job.final()
    assert state.is_completed(), state.message
    assert state.result().approved_by == "bob"
    d1 = train.digests["D1"].digest
    assert serving(train, PROD) == {"course": d1, "course-b": d1}
    record = Ledger().current(PROD).services["course"]
    assert (record.approved_by, record.promoted_by, record.verified) == ("bob", "alice", True)
    wait_until(lambda: len(events(receiver, "resolve")) >= 1)


def test_staging_update_then_production_rejection_deploys_nothing(train: Train) -> None:
    state = run(train, STG, promoted_by="ci")
    assert state.is_completed(), state.message
    d2, d3 = train.digests["D2"].digest, train.digests["D3"].digest
    assert serving(train, STG) == {"course": d2, "course-b": d3}
    assert Ledger().current(STG).previous["course"].image.digest == train.digests["D1"].digest

    revision = Ledger().current(PROD).revision
    before = set(train.run_ids)
    job = Background(train, PROD, promoted_by="alice")
    run_id = paused_run(before)
    release = read_gate(run_id).release_id or ""
    with pytest.raises(ApprovalRefused, match="reason"):
        submit_answer(run_id, approval_input("carol", release, "reject"))
    submit_answer(run_id, approval_input("carol", release, "reject", "load test pending"))
    final = job.final()
    assert final.is_failed()
    error = final.result(raise_on_failure=False)
    assert isinstance(error, PromotionRejected)
    assert "carol rejected" in str(error)
    assert "load test pending" in str(error)
    assert Ledger().current(PROD).revision == revision
    d1 = train.digests["D1"].digest
    assert serving(train, PROD) == {"course": d1, "course-b": d1}


def test_approval_timeout_deploys_nothing(train: Train, receiver: Receiver) -> None:
    revision = Ledger().current(PROD).revision
    started = time.monotonic()
    state = run(train, PROD, promoted_by="alice", config_source=train.slow_gate_path)
    assert state.is_failed()
    # the server fails an expired pause itself; the flow's reason is in its log and notice
    assert "never resumed" in state.message
    run_id = state.state_details.flow_run_id
    reason = "within 3s; nothing deployed"
    wait_until(lambda: any("nobody approved release" in m and reason in m for m in logs_of(run_id)))
    wait_until(lambda: any("nobody approved in time" in t for t in slack_texts(receiver)))
    assert time.monotonic() - started < 60
    assert Ledger().current(PROD).revision == revision
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
    recorded = Ledger().current(PROD)
    state = approve_in_background(train, drill_env={d3: drill})
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, PromotionRolledBack), error
    assert failure in error.failed
    assert "course-b" in error.failed
    assert error.restored == {"course": d1, "course-b": d1}
    # course (D2) deployed fine and was rolled back with course-b: both serve D1 again
    assert serving(train, PROD) == {"course": d1, "course-b": d1}
    after = Ledger().current(PROD)
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


def test_good_release_deploys_and_resolves_the_incident(train: Train, receiver: Receiver) -> None:
    resolves = len(events(receiver, "resolve"))
    state = approve_in_background(train, approver="carol")
    assert state.is_completed(), state.message
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
    assert Ledger().current(PROD).services["course"].image.digest == d1
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
    first_id = paused_run(before)
    # Waiting for a person holds no lock: the second promotion reaches its gate too.
    second = Background(train, PROD, promoted_by="alice")
    second_id = paused_run(before | {first_id})
    approved_plan = read_gate(second_id).release_id or ""
    submit_answer(first_id, approval_input("bob", read_gate(first_id).release_id or ""))
    assert first.final().is_completed()
    revision = Ledger().current(PROD).revision
    submit_answer(second_id, approval_input("carol", approved_plan))
    final = second.final()
    assert final.is_failed()
    error = final.result(raise_on_failure=False)
    assert isinstance(error, PromotionRefused), error
    assert "changed while release" in str(error)
    assert "nothing deployed" in str(error)
    # the second approval moved nothing: what the first deployed, and who approved it, stay
    assert Ledger().current(PROD).revision == revision
    record = Ledger().current(PROD).services["course"]
    assert record.approved_by == "bob"
    assert record.image.digest == train.digests["D2"].digest
    assert serving(train, PROD)["course"] == train.digests["D2"].digest

    ids = [first_id, second_id]
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    began = {t.flow_run_id for t in tasks if t.name.startswith("begin-deploys")}
    assert began == {first_id}, "the refused promotion began deploying"


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

"""Whole CI runs (checks, build, push, dev deploy, health, record) under faults injected by
proxies in front of the real services: the Prefect API, the stack's registry and the
engine's API socket. The run reaches the registry and the engine only through their
proxies (the environment's registry block and DOCKER_HOST name them).

What must hold: a transient fault is retried and the run ships, or the run fails with a
message naming the fault, and the environment keeps serving what it served; the ledger
changes only with what serves. One service (`auth`), the environment `cf-dev` on its own
ports; each test commits a change, so each run builds, pushes and deploys a new image.
"""

from __future__ import annotations

import dataclasses
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import docker
import httpx
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State
from prefect.settings import PREFECT_API_URL, temporary_settings

from blocks.registry import OciRegistry
from blocks.stack import StackInfo
from core.records import CiOutcome, StageResult, short_digest
from flows.ci import ci, ci_outcome
from tests.ledgers import current_ledger
from tests.plugins.faults import Fault, FaultProxy
from tests.runs import finished, task_runs_of
from tests.tasks.ci_checkout import commit_all, copy_monorepo, git, pinned
from tests.trust import pin_repository

pytestmark = pytest.mark.stack

REPO = Path(__file__).resolve().parents[2]
SERVICE = "auth"
ENV = "cf-dev"
OFFSET = 24100
BLOCK = "cf-dev-registry"
LEDGER_BUCKET = "elice-ci-ledger-faults"
MOTO = {  # the host's AWS credentials, as the S3 client reads them
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class Delivery:
    """The checkout, its pinned remote, the configuration and the proxies."""

    repo: Path
    remote: Path
    config: str
    registry: FaultProxy
    engine: FaultProxy
    port: int
    changes: int = 0

    def change(self) -> str:
        """A new commit of the service on the protected branch: a new image to ship. The
        note names this session's checkout, so no earlier suite run on this machine (the
        stack's registry outlives it) has published an image of the same content."""
        self.changes += 1
        note = self.repo / "services" / SERVICE / "fault-note.txt"
        note.write_text(f"change {self.changes} of {self.repo}\n")
        commit = commit_all(self.repo, f"change {self.changes}")
        git(self.repo, "push", "-q", str(self.remote), "main")
        return commit

    def run(self) -> State[Any]:
        return ci(
            services=[SERVICE],
            repo=str(self.repo),
            deliver=True,
            environment=ENV,
            config_source=self.config,
            return_state=True,
        )

    def serving(self) -> str | None:
        """The digest the service's /version reports in the environment (None: no answer)."""
        try:
            answer = httpx.get(f"http://127.0.0.1:{self.port}/version", timeout=10)
        except httpx.HTTPError:
            return None
        return str(answer.json()["digest"]) if answer.status_code == 200 else None


def _delete_block(name: str) -> None:
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(name, "elice-oci-registry")
        client.delete_block_document(document.id)


@pytest.fixture(scope="module")
def delivery(stack: StackInfo, docker_client: docker.DockerClient) -> Iterator[Delivery]:
    """A checkout of one service pinned as the repository; cf-dev pushes to the stack's
    registry through a proxy, the engine is reached through another."""
    root = Path(tempfile.mkdtemp(prefix="ci-faults-"))
    repo = copy_monorepo(root / "repo", [SERVICE])
    registry = FaultProxy(stack.registry)
    assert stack.docker_host.startswith("unix://"), stack.docker_host
    engine = FaultProxy(stack.docker_host.removeprefix("unix://"))
    OciRegistry(address=registry.address, insecure=True).save(BLOCK, overwrite=True)
    data = yaml.safe_load((REPO / "config" / "pipeline.yaml").read_text())
    data["environments"] = [
        {
            "name": ENV,
            "namespace": "elice-cf-dev",
            "replicas": {"min": 1, "max": 1},
            "log_level": "INFO",
            "storage": "minio",
            "local_port_offset": OFFSET,
            "registry": {"kind": "oci", "block": BLOCK},
        }
    ]
    config = root / "pipeline.yaml"
    config.write_text(yaml.safe_dump(data))
    port = next(s["port"] for s in data["services"] if s["name"] == SERVICE) + OFFSET
    try:
        with (
            pytest.MonkeyPatch.context() as patch,
            pinned(repo, registries={BLOCK: registry.address}) as remote,
        ):
            patch.setenv("DOCKER_HOST", f"tcp://{engine.address}")
            yield Delivery(repo, remote, str(config), registry, engine, port)
    finally:
        for container in docker_client.containers.list(all=True, filters={"name": f"-{ENV}-"}):
            container.remove(force=True)
        _delete_block(BLOCK)
        registry.close()
        engine.close()


def _outcome(state: State[Any]) -> CiOutcome:
    outcome = ci_outcome(state)
    assert outcome is not None, state.message
    return outcome


def _stages(outcome: CiOutcome) -> dict[str, StageResult]:
    return {r.stage: r for r in outcome.results if r.service == SERVICE}


def _shipped(delivery: Delivery, state: State[Any]) -> str:
    """The run passed and the environment serves, and the ledger records, its image."""
    assert state.is_completed(), state.message
    stages = _stages(_outcome(state))
    for stage in ("image", "deploy", "health", "record"):
        assert stages[stage].status == "passed", (stage, stages[stage].summary)
    digest = str(stages["image"].details["digest"])
    assert delivery.serving() == digest
    assert current_ledger().current(ENV).services[SERVICE].image.digest == digest
    return digest


@pytest.fixture(scope="module")
def serving(delivery: Delivery) -> list[str]:
    """What cf-dev serves, updated by each test that ships: first, a run without faults."""
    return [_shipped(delivery, delivery.run())]


def _kept(delivery: Delivery, serving: list[str], state: State[Any], stage: str) -> str:
    """The run failed at `stage`; what served before still serves and is what the ledger
    records. Returns the stage's summary."""
    assert state.is_failed(), state.message
    stages = _stages(_outcome(state))
    assert stages[stage].status == "failed", (stage, stages[stage])
    assert "record" not in stages or stages["record"].status != "passed"
    assert delivery.serving() == serving[-1]
    assert current_ledger().current(ENV).services[SERVICE].image.digest == serving[-1]
    return stages[stage].summary


def test_a_prefect_api_blip_during_a_ci_run_is_retried(
    delivery: Delivery, serving: list[str], fault_proxy: type[FaultProxy]
) -> None:
    url = str(PREFECT_API_URL.value())
    host = url.split("://", 1)[1].split("/", 1)[0]
    api = fault_proxy(host)
    # once the run is under way: two requests answered 503, then two refused (one
    # request may meet all four: Prefect's client tries each up to six times)
    api.inject(Fault("status", status=503, first=12, times=2))
    api.inject(Fault("refuse", first=12, times=2))
    delivery.change()
    with temporary_settings({PREFECT_API_URL: url.replace(host, api.address)}):
        state = delivery.run()
    assert [f.fired for f in api.faults] == [2, 2], len(api.requests)
    serving.append(_shipped(delivery, state))
    assert serving[-1] != serving[-2]


def _attempts(state: State[Any], task: str) -> list[int]:
    """How many times each run of `task` in the run ran (1: never retried)."""
    run_id = state.state_details.flow_run_id
    assert run_id is not None
    runs = task_runs_of([run_id], finished(task))
    return [r.run_count for r in runs if r.name.startswith(f"{task}-")]


ENGINE_OWN_RETRIES_S = 15
"""Longer than Podman's own retries of a push that meets a refused or cut connection
(four tries 1, 2 and 4 s apart: about 7 s here): an outage that outlasts them reaches the
pipeline, and the push task's retries (2 s, 4 s, 8 s apart) outlast it."""


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(Fault("status", method="PUT", path="/manifests/", status=503), id="503"),
        pytest.param(
            Fault("refuse", method="POST", path="/blobs/uploads/", times=None),
            id="refused",
        ),
        pytest.param(
            Fault("drop", method="PATCH", path="/blobs/uploads/", times=None),
            id="dropped-mid-push",
        ),
    ],
)
def test_a_registry_blip_during_the_push_is_retried_and_ships(
    delivery: Delivery, serving: list[str], fault: Fault
) -> None:
    """A 503 on the manifest's upload (the engine does not retry it), or every blob upload
    refused, or its answer cut off, for longer than the engine's own retries: the engine
    reports it in the push's stream; the push task retries it and the run ships."""
    window = None if fault.kind == "status" else ENGINE_OWN_RETRIES_S
    injected = delivery.registry.inject(dataclasses.replace(fault, window=window))
    delivery.change()
    try:
        state = delivery.run()
    finally:
        delivery.registry.clear()
    assert injected.fired >= 1
    serving.append(_shipped(delivery, state))
    attempts = _attempts(state, "push_image")
    assert len(attempts) == 1, attempts
    assert attempts[0] >= 2, attempts  # the engine's error reached the task, which retried


def test_a_registry_refusing_the_push_is_not_retried(
    delivery: Delivery, serving: list[str]
) -> None:
    """403 is the registry's answer, not a blip: one push, the image stage fails naming
    the denial, and what served still serves."""
    denied = (
        b'{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}'
    )
    fault = delivery.registry.inject(
        Fault("status", method="POST", path="/blobs/uploads/", status=403, body=denied, times=None)
    )
    delivery.change()
    try:
        state = delivery.run()
    finally:
        delivery.registry.clear()
    assert fault.fired >= 1
    summary = _kept(delivery, serving, state, "image")
    assert "denied" in summary, summary
    assert _attempts(state, "push_image") == [1]


def test_an_engine_500_during_the_dev_deploy_keeps_what_served(
    delivery: Delivery, serving: list[str]
) -> None:
    fault = delivery.engine.inject(
        Fault(
            "status",
            method="POST",
            path=r"/containers/create",
            status=500,
            body=b'{"message":"injected engine fault","response":500}',
        )
    )
    delivery.change()
    try:
        state = delivery.run()
    finally:
        delivery.engine.clear()
    assert fault.fired == 1
    if state.is_completed():
        serving.append(_shipped(delivery, state))
        return
    summary = _kept(delivery, serving, state, "deploy")
    assert "injected engine fault" in summary, summary


@contextmanager
def _s3_ledger(
    delivery: Delivery,
    moto_endpoint: str,
    folder: Path,
    proxy: FaultProxy,
    secret: str = MOTO["AWS_SECRET_ACCESS_KEY"],
) -> Iterator[None]:
    """The trust file pins the ledger in moto's S3 at a fresh prefix, reached through
    `proxy`; the S3 client's secret key is `secret`."""
    direct = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    direct.create_bucket(Bucket=LEDGER_BUCKET)
    prefix = f"ci-{uuid.uuid4().hex[:12]}"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**MOTO, "AWS_SECRET_ACCESS_KEY": secret}.items():
            patch.setenv(name, value)
        pin_repository(
            patch,
            folder,
            delivery.remote,
            registries={BLOCK: delivery.registry.address},
            ledger=f"s3://{LEDGER_BUCKET}/{prefix}",
            s3_endpoint=f"http://{proxy.address}",
        )
        yield


def test_an_object_store_outage_at_the_record_is_retried_and_ships(
    delivery: Delivery,
    serving: list[str],
    moto_endpoint: str,
    tmp_path: Path,
    fault_proxy: type[FaultProxy],
) -> None:
    """The trust file pins the ledger in moto's S3, reached through a proxy: the record's
    write meets 503s past the S3 client's own six attempts; the record task retries it
    and the run ships, the release recorded once."""
    proxy = fault_proxy(moto_endpoint.removeprefix("http://"))
    fault = proxy.inject(Fault("status", method="PUT", path=f"/ledger/{ENV}/", times=7))
    delivery.change()
    with _s3_ledger(delivery, moto_endpoint, tmp_path, proxy):
        state = delivery.run()
        assert fault.fired == 7
        serving.append(_shipped(delivery, state))
        history = current_ledger().history(ENV)
    recorded = [s.services[SERVICE].image.digest for s in history if SERVICE in s.services]
    assert recorded == [serving[-1]]  # one revision: the record, written once


S3_ACCESS_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied</Message><RequestId>4442587FB7D0A2F9</RequestId></Error>"
)
"""S3's own answer to a write its policy refuses (403)."""


def test_an_object_store_denying_the_record_takes_the_release_back_out_of_dev(
    delivery: Delivery,
    serving: list[str],
    moto_endpoint: str,
    tmp_path: Path,
    fault_proxy: type[FaultProxy],
) -> None:
    """S3 refuses the record of a healthy dev deploy with 403 AccessDenied: an answer, not
    a blip, so one write and no retry. A release the ledger does not name must not serve
    (promotions take dev's releases from its ledger): dev is put back to what served
    before the run, and the record stage names the bucket and the denial, never the credentials."""
    proxy = fault_proxy(moto_endpoint.removeprefix("http://"))
    fault = proxy.inject(
        Fault(
            "status",
            method="PUT",
            path=f"/ledger/{ENV}/",
            status=403,
            body=S3_ACCESS_DENIED,
            times=None,
        )
    )
    delivery.change()
    secret = f"secret-{uuid.uuid4().hex}"
    with _s3_ledger(delivery, moto_endpoint, tmp_path, proxy, secret):
        state = delivery.run()
        history = current_ledger().history(ENV)
    assert fault.fired == 1  # neither the S3 client nor the record task retried it
    assert _attempts(state, "record_release") == [1]
    assert state.is_failed(), state.message
    stages = _stages(_outcome(state))
    assert stages["deploy"].status == "passed"
    assert stages["deploy"].details["digest"] != serving[-1]  # the new release did deploy
    record = stages["record"]
    assert record.status == "failed", record
    assert f"s3://{LEDGER_BUCKET}/" in record.summary, record.summary
    assert "AccessDenied" in record.summary, record.summary
    assert f"serving again: {SERVICE} {short_digest(serving[-1])}" in record.summary, record

    assert secret not in f"{record.summary} {record.excerpt} {state.message}"
    assert delivery.serving() == serving[-1]
    assert history == []  # nothing recorded: the ledger names what serves

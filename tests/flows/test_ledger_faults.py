"""Faults at the ledger's object store during a promotion: moto's S3 server behind the
fault proxy holds the ledger (the saved storage block, ELICE_STORAGE=blocks), and the
proxy hits the ledger's writes of the environment promoted into.

What must hold, whatever the store does: the release that was serving still serves, the
ledger says what happened (or keeps the intent for the next run to find, when it cannot
be written at all), and the cause is the error's, never replaced by a later ledger error.
The store client's budget is the storage's own setting (its credentials' botocore
config: two attempts, one-second timeouts), so the tests stay short.
Own environments (fl-dev -> fl-stg, host ports 391xx/396xx).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import docker
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State
from prefect.filesystems import LocalFileSystem
from prefect_aws import AwsCredentials
from prefect_aws.client_parameters import AwsClientParameters

from blocks.config import PipelineConfig, load_config
from blocks.stack import StackInfo
from blocks.storage import STORAGE_BLOCK, ReleaseStorage
from core.errors import LedgerError, LedgerUnavailable, PromotionRolledBack
from core.records import ImageRef, PromotionOutcome
from flows.promotion import promote
from tasks.releases import (
    DeployIntent,
    EnvironmentState,
    Ledger,
    ReleaseRecord,
    end_deploys,
    with_deploy,
    with_intent,
)
from tests.flows.chain import SERVICES, derive, put_verified, remove_containers, write_chain_config
from tests.flows.test_promotion_faults import serving
from tests.ledgers import current_ledger
from tests.plugins.faults import Fault, FaultProxy

DEV, STG = "fl-dev", "fl-stg"
BUCKET = "elice-ledger-faults"
WRITES = r"/ledger/fl-stg/"  # the ledger revisions of the environment promoted into
LATE_S = 60
"""How long the late record is held back: past the run's retries, restores and end."""
SHORT = {
    "retries": {"mode": "standard", "total_max_attempts": 2},
    "connect_timeout": 1,
    "read_timeout": 1,
}


def _storage(moto_endpoint: str, proxy: FaultProxy, credentials: AwsCredentials) -> ReleaseStorage:
    """A fresh ledger (a prefix of its own) in moto's S3, reached through `proxy`."""
    direct = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    direct.create_bucket(Bucket=BUCKET)
    short = credentials.model_copy(
        update={"aws_client_parameters": AwsClientParameters(config=SHORT)}
    )
    return ReleaseStorage(
        kind="s3",
        bucket=BUCKET,
        prefix=f"t-{uuid.uuid4().hex[:12]}",
        credentials=short,
        endpoint_url=f"http://{proxy.address}",
    )


@pytest.fixture
def s3_proxy(
    moto_endpoint: str, aws_credentials: AwsCredentials, fault_proxy: type[FaultProxy]
) -> tuple[FaultProxy, ReleaseStorage]:
    proxy = fault_proxy(moto_endpoint.removeprefix("http://"))
    return proxy, _storage(moto_endpoint, proxy, aws_credentials)


# --- the store and the ledger, without a promotion --------------------------------------


def test_a_write_whose_answer_was_lost_is_the_writers_own(
    s3_proxy: tuple[FaultProxy, ReleaseStorage],
) -> None:
    """The store finished a write the client had given up on (slower than its timeout):
    the client's retry meets the object (412), and the ledger reads it back as its own
    instead of taking it for another writer's and writing the same change again."""
    proxy, storage = s3_proxy
    ledger = Ledger(storage.filesystem("ledger"))
    # the client gives an attempt 2 s (1 s for "100 Continue", 1 s for the answer): the
    # first lands 2.5 s in, given up on; the retry (sent 2-3 s in) is held 1 s, so it
    # always reaches the store after the first, and is answered within its 2 s
    proxy.inject(Fault("delay", seconds=2.5, method="PUT", path=WRITES))
    proxy.inject(Fault("delay", seconds=1.0, method="PUT", path=WRITES))
    written = ledger.update(STG, lambda state: state.model_copy(update={"change": "one"}))
    assert [f.fired for f in proxy.faults] == [1, 1]
    assert [v for m, _, v in proxy.requests if m == "PUT"] == ["delay", "delay"]
    assert [(s.revision, s.change) for s in ledger.history(STG)] == [(1, "one")]
    assert written == ledger.current(STG)


@pytest.mark.parametrize(
    ("fault", "error", "attempts"),
    [
        pytest.param(Fault("refuse", times=None), LedgerUnavailable, 2, id="refused"),
        pytest.param(Fault("status", status=503, times=None), LedgerUnavailable, 2, id="503"),
        pytest.param(Fault("status", status=403, times=None), LedgerError, 1, id="denied"),
    ],
)
def test_store_faults_are_ledger_errors_retried_only_when_they_may_pass(
    s3_proxy: tuple[FaultProxy, ReleaseStorage],
    fault: Fault,
    error: type[LedgerError],
    attempts: int,
) -> None:
    proxy, storage = s3_proxy
    ledger = Ledger(storage.filesystem("ledger"))
    ledger.update(STG, lambda state: state)
    proxy.inject(dataclasses.replace(fault, method="PUT", path=WRITES))
    with pytest.raises(LedgerError) as raised:
        ledger.update(STG, lambda state: state.model_copy(update={"change": "two"}))
    assert type(raised.value) is error, repr(raised.value)
    assert proxy.faults[0].fired == attempts  # the client's budget; a refusal only once
    proxy.clear()
    assert ledger.current(STG).revision == 1


def test_a_write_slower_than_the_timeout_fails_and_may_still_land(
    s3_proxy: tuple[FaultProxy, ReleaseStorage],
) -> None:
    """Past the client's timeout a write is LedgerUnavailable, yet the store finishes what
    it received: the revision appears after the writer gave up. The ledger never takes it
    for someone else's (exclusive creation: whoever writes next meets it, reads it back)."""
    proxy, storage = s3_proxy
    ledger = Ledger(storage.filesystem("ledger"))
    proxy.inject(Fault("delay", seconds=2.5, method="PUT", path=WRITES, times=None))
    with pytest.raises(LedgerUnavailable, match="Read timeout"):
        ledger.update(STG, lambda state: state.model_copy(update={"change": "slow"}))
    assert proxy.faults[0].fired == 2
    proxy.clear()
    deadline = time.monotonic() + 10
    while not ledger.current(STG).revision and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [(s.revision, s.change) for s in ledger.history(STG)] == [(1, "slow")]


def test_a_record_that_lands_after_its_run_gave_up_is_undone_with_the_intent(
    tmp_path: Path,
) -> None:
    """The run's record was slower than its timeout: the run rolled back, yet the store
    finished the record (intent cleared, the rolled-back release named). Clearing the
    intent puts back what the intent's revision recorded."""
    fs = LocalFileSystem(basepath=str(tmp_path))
    ledger = Ledger(fs)
    old = ImageRef(service="course", repository="r/elice/course", digest="sha256:" + "a" * 64)
    new = old.model_copy(update={"digest": "sha256:" + "b" * 64})
    ledger.record_deploy(
        STG, ReleaseRecord(service="course", environment=STG, image=old, release_id="r0")
    )
    intent = DeployIntent(
        release_id="r1", flow_run_id="run-1", images={"course": new}, previous={"course": None}
    )
    before = ledger.update(STG, lambda state: with_intent(state, intent))
    late = ReleaseRecord(
        service="course", environment=STG, image=new, release_id="r1", flow_run_id="run-1"
    )
    ledger.update(
        STG, lambda state: with_deploy(state, late).model_copy(update={"in_progress": None})
    )
    after = end_deploys.fn(fs, STG, "run-1", "release r1 rolled back: the record timed out")
    assert after.services == before.services
    assert after.previous == before.previous
    assert after.in_progress is None
    assert "written after the run gave up, undone" in after.change
    with pytest.raises(LedgerError, match="has no deploys under way"):
        end_deploys.fn(fs, STG, "run-2", "nothing of run-2 here")


# --- during a promotion ---------------------------------------------------------------


@pytest.fixture
def releases(
    tmp_path: Path,
    stack: StackInfo,
    docker_client: docker.DockerClient,
    pushed_image: ImageRef,
    s3_proxy: tuple[FaultProxy, ReleaseStorage],
) -> Iterator[tuple[PipelineConfig, str, ImageRef, ImageRef, FaultProxy]]:
    """fl-stg serves D1 of both services, fl-dev holds a verified D2; the ledger (and the
    backups) live in S3 behind the proxy."""
    proxy, storage = s3_proxy
    mp = pytest.MonkeyPatch()
    mp.setenv("DOCKER_HOST", stack.docker_host)
    storage.save(STORAGE_BLOCK, overwrite=True)
    mp.setenv("ELICE_STORAGE", "blocks")
    cfg_path = write_chain_config(tmp_path / "pipeline.yaml", [(DEV, 31100), (STG, 31600)])
    cfg = load_config(cfg_path)
    remove_containers(docker_client, [DEV, STG])
    d2 = derive(docker_client, pushed_image, "ledger-fault")
    for service in SERVICES:
        put_verified(cfg, STG, service, pushed_image)
        put_verified(cfg, DEV, service, d2)
    try:
        yield cfg, cfg_path, pushed_image, d2, proxy
    finally:
        proxy.clear()
        remove_containers(docker_client, [DEV, STG])
        with get_client(sync_client=True) as client:
            document = client.read_block_document_by_name(STORAGE_BLOCK, "elice-release-storage")
            client.delete_block_document(document.id)
        mp.undo()


def _promote(cfg_path: str) -> State[PromotionOutcome]:
    return promote(
        environment=STG,
        config_source=cfg_path,
        promoted_by="ci",
        health_deadline_s=30,
        return_state=True,
    )


def _recorded(state: EnvironmentState) -> dict[str, str]:
    return {name: record.image.digest for name, record in state.services.items()}


def test_a_ledger_that_fails_the_record_leaves_the_old_release_and_the_intent(
    releases: tuple[PipelineConfig, str, ImageRef, ImageRef, FaultProxy],
) -> None:
    """The store goes away after the intent is written: the verified release cannot be
    recorded (after its retries), so every service goes back; the rollback cannot be
    recorded either, and says so without hiding the cause; the intent stays. The next
    promotion, the store back, finds it, checks what serves and promotes."""
    cfg, cfg_path, d1, d2, proxy = releases
    before = current_ledger().current(STG)
    # the first write (the intent) passes; every later one is refused
    proxy.inject(Fault("refuse", method="PUT", path=WRITES, first=2, times=None))
    state = _promote(cfg_path)
    assert state.is_failed(), state.message
    error = state.result(raise_on_failure=False)
    assert isinstance(error, PromotionRolledBack), repr(error)
    assert error.plan is not None
    release = error.plan.release_id
    # the cause is the record's failure, not the rollback's note
    assert "cannot write s3://" in error.failed
    assert f"{before.revision + 2:08d}.json" in error.failed  # the record's (after the intent)
    assert "the ledger could not record the rollback" in str(error)
    assert error.restored == dict.fromkeys(SERVICES, d1.digest)
    assert serving(cfg, STG) == dict.fromkeys(SERVICES, d1.digest)
    # record: 1 try + 2 task retries, end_deploys the same, two attempts each
    assert proxy.faults[0].fired == 12
    proxy.clear()
    after = current_ledger().current(STG)
    assert _recorded(after) == _recorded(before)
    assert after.in_progress is not None
    assert after.in_progress.release_id == release

    second = _promote(cfg_path)
    assert second.is_completed(), second.message
    final = current_ledger().current(STG)
    assert final.in_progress is None
    assert _recorded(final) == dict.fromkeys(SERVICES, d2.digest)
    changes = [s.change for s in current_ledger().history(STG)]
    assert any(f"died deploying release {release}" in c for c in changes)
    assert serving(cfg, STG) == dict.fromkeys(SERVICES, d2.digest)


def test_a_store_that_denies_the_record_is_not_retried(
    releases: tuple[PipelineConfig, str, ImageRef, ImageRef, FaultProxy],
) -> None:
    """403 is an answer: one attempt for the record, one for the rollback's note."""
    cfg, cfg_path, d1, _, proxy = releases
    before = current_ledger().current(STG)
    proxy.inject(Fault("status", status=403, method="PUT", path=WRITES, first=2, times=None))
    state = _promote(cfg_path)
    error = state.result(raise_on_failure=False)
    assert isinstance(error, PromotionRolledBack), repr(error)
    assert "(HTTP 403)" in error.failed
    assert proxy.faults[0].fired == 2
    assert serving(cfg, STG) == dict.fromkeys(SERVICES, d1.digest)
    proxy.clear()
    after = current_ledger().current(STG)
    assert _recorded(after) == _recorded(before)
    assert after.in_progress is not None


def test_a_record_landing_after_the_rollbacks_own_write_failed_is_undone_by_the_next_run(
    releases: tuple[PipelineConfig, str, ImageRef, ImageRef, FaultProxy],
) -> None:
    """The record is slower than the client's timeout, and every write after it is
    refused: the run rolls back and cannot clear its intent. Then the store finishes the
    record, which clears the intent and names the release that was rolled back. The next
    promotion sees what serves, undoes the late record, and promotes."""
    cfg, cfg_path, d1, d2, proxy = releases
    before = current_ledger().current(STG)
    late = proxy.inject(Fault("delay", method="PUT", path=WRITES, first=2, seconds=LATE_S))
    proxy.inject(Fault("refuse", method="PUT", path=WRITES, first=2, times=None))
    state = _promote(cfg_path)
    error = state.result(raise_on_failure=False)
    assert isinstance(error, PromotionRolledBack), repr(error)
    assert error.plan is not None
    assert "the ledger could not record the rollback" in str(error)
    assert serving(cfg, STG) == dict.fromkeys(SERVICES, d1.digest)
    assert late.fired == 1
    assert current_ledger().current(STG).in_progress is not None  # the record not landed yet
    deadline = time.monotonic() + LATE_S + 30
    while current_ledger().current(STG).in_progress is not None:
        assert time.monotonic() < deadline, "the late record never landed"
        time.sleep(0.5)
    landed = current_ledger().current(STG)
    assert _recorded(landed) == dict.fromkeys(SERVICES, d2.digest)  # names what does not serve
    proxy.clear()

    second = _promote(cfg_path)
    assert second.is_completed(), second.message
    history = current_ledger().history(STG)
    undone = [s for s in history if "landed after the run had rolled it back" in s.change]
    assert len(undone) == 1
    assert _recorded(undone[0]) == _recorded(before)
    assert undone[0].in_progress is None
    final = current_ledger().current(STG)
    assert final.in_progress is None
    assert _recorded(final) == dict.fromkeys(SERVICES, d2.digest)
    assert all(
        r.flow_run_id == str(second.state_details.flow_run_id) for r in final.services.values()
    )
    assert serving(cfg, STG) == dict.fromkeys(SERVICES, d2.digest)


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(Fault("refuse", times=3), id="refused-briefly"),
        pytest.param(Fault("status", status=503, times=3), id="503-briefly"),
        pytest.param(Fault("delay", seconds=2.5, times=1), id="slow-once"),
    ],
)
def test_a_short_store_outage_at_the_record_is_waited_out(
    releases: tuple[PipelineConfig, str, ImageRef, ImageRef, FaultProxy], fault: Fault
) -> None:
    """A blip at the record (fewer failures than the client's and the task's retries; a
    write slower than the client's timeout, which the store still finishes) is retried:
    the release is recorded once, and serves."""
    cfg, cfg_path, _, d2, proxy = releases
    start = current_ledger().current(STG).revision
    proxy.inject(dataclasses.replace(fault, method="PUT", path=WRITES, first=2))
    state = _promote(cfg_path)
    assert state.is_completed(), state.message
    assert proxy.faults[0].fired == fault.times
    assert serving(cfg, STG) == dict.fromkeys(SERVICES, d2.digest)
    history = current_ledger().history(STG)[start:]
    assert [s.in_progress is not None for s in history] == [True, False]  # intent, record
    assert _recorded(history[-1]) == dict.fromkeys(SERVICES, d2.digest)
    assert all(r.verified for r in history[-1].services.values())

"""Environment backups on a local directory and on S3 (a real moto server)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prefect import flow
from prefect.filesystems import LocalFileSystem, WritableFileSystem
from prefect_aws import AwsCredentials

from blocks.storage import ReleaseStorage
from core.errors import BackupError
from core.records import DeployedService, ImageRef
from tasks.backup import (
    BACKUP_ID,
    Backup,
    backup_environment,
    latest_backup,
    list_backups,
    load_backup,
    new_backup_id,
    restore_targets,
)
from tasks.releases import EnvironmentState, Ledger, ReleaseRecord
from tasks.stores import open_store


def image(service: str, hexchar: str) -> ImageRef:
    return ImageRef(
        service=service,
        repository=f"127.0.0.1:5000/elice/{service}",
        digest="sha256:" + hexchar * 64,
    )


def deployed(service: str, hexchar: str, env: str = "staging") -> DeployedService:
    return DeployedService(
        service=service,
        environment=env,
        image=image(service, hexchar),
        address="http://127.0.0.1:28001",
    )


def staging_state(fs: WritableFileSystem) -> EnvironmentState:
    ledger = Ledger(fs)
    for service, hexchar in (("auth", "a"), ("media", "b")):
        ledger.record_deploy(
            "staging",
            ReleaseRecord(
                service=service,
                environment="staging",
                image=image(service, hexchar),
                release_id="r1",
            ),
        )
    return ledger.current("staging")


@pytest.fixture(params=["local", "s3"])
def storage(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    moto_endpoint: str,
    aws_credentials: AwsCredentials,
) -> ReleaseStorage:
    if request.param == "local":
        return ReleaseStorage(path=str(tmp_path))
    bucket = f"backups-{uuid.uuid4().hex[:12]}"
    params = aws_credentials.aws_client_parameters.model_copy(
        update={"endpoint_url": moto_endpoint}
    )
    client = aws_credentials.model_copy(update={"aws_client_parameters": params}).get_s3_client()
    client.create_bucket(Bucket=bucket)
    return ReleaseStorage(
        kind="s3", bucket=bucket, credentials=aws_credentials, endpoint_url=moto_endpoint
    )


def test_backup_ids_sort_by_time() -> None:
    early = new_backup_id(datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=UTC))
    late = new_backup_id(datetime(2026, 1, 2, 3, 4, 5, 7000, tzinfo=UTC))
    assert early.startswith("20260102T030405006Z-")
    assert BACKUP_ID.match(early)
    assert early < late


def test_restore_targets_prefer_live_digests() -> None:
    state = EnvironmentState(
        environment="staging",
        services={
            "auth": ReleaseRecord(
                service="auth", environment="staging", image=image("auth", "a"), release_id="r1"
            ),
            "media": ReleaseRecord(
                service="media", environment="staging", image=image("media", "b"), release_id="r1"
            ),
        },
    )
    backup = Backup(
        backup_id=new_backup_id(),
        environment="staging",
        ledger=state,
        live={"auth": deployed("auth", "c"), "media": None, "search": deployed("search", "d")},
    )
    targets = restore_targets(backup)
    assert list(targets) == ["auth", "media", "search"]
    assert targets["auth"] == image("auth", "c")  # what actually served
    assert targets["media"] is None  # was not running: remove it
    assert targets["search"] == image("search", "d")


def test_backup_round_trip(storage: ReleaseStorage) -> None:
    state = staging_state(storage.filesystem("ledger"))
    backups = storage.filesystem("backups")
    live = {"auth": deployed("auth", "a"), "media": None}
    manifests = [{"kind": "Deployment", "metadata": {"name": "auth"}}]

    @flow
    def take() -> list[str]:
        first = backup_environment("staging", state, live, manifests, fs=backups)
        second = backup_environment("staging", state, {"auth": None}, None, fs=backups)
        return [first, second]

    first, second = take()
    assert list_backups("staging", fs=backups) == [first, second]
    assert list_backups("production", fs=backups) == []

    loaded = load_backup("staging", first, fs=backups)
    assert loaded.ledger == state
    assert loaded.live == live
    assert loaded.manifests == manifests
    assert restore_targets(loaded) == {"auth": image("auth", "a"), "media": None}

    latest = latest_backup("staging", fs=backups)
    assert latest is not None
    assert latest.backup_id == second
    assert latest_backup("production", fs=backups) is None
    raw = json.loads(open_store(backups).read(f"staging/{first}.json") or b"{}")
    assert raw["live"]["auth"]["image"]["digest"] == "sha256:" + "a" * 64


def test_backup_refuses_bad_input_before_writing(tmp_path: Path) -> None:
    fs = LocalFileSystem(basepath=str(tmp_path))
    state = EnvironmentState(environment="staging")
    with pytest.raises(ValueError, match="DNS-1123"):
        backup_environment.fn("Staging!", state, {}, None, fs=fs)
    with pytest.raises(ValueError, match="given for a backup of"):
        backup_environment.fn("production", state, {}, None, fs=fs)
    with pytest.raises(ValueError, match="not deployed in 'staging'"):
        backup_environment.fn("staging", state, {"auth": deployed("auth", "a", "dev")}, None, fs=fs)
    assert list(tmp_path.iterdir()) == []


def test_load_backup_errors(tmp_path: Path) -> None:
    fs = LocalFileSystem(basepath=str(tmp_path))
    with pytest.raises(ValueError, match="malformed backup id"):
        load_backup("staging", "../../etc/passwd", fs=fs)
    missing = new_backup_id()
    with pytest.raises(BackupError, match=f"no backup {missing}"):
        load_backup("staging", missing, fs=fs)
    (tmp_path / "staging").mkdir()
    (tmp_path / "staging" / f"{missing}.json").write_text('{"backup_id": 1}')
    with pytest.raises(BackupError, match="is corrupt"):
        load_backup("staging", missing, fs=fs)
    (tmp_path / "staging" / "notes.txt").write_text("not a backup")
    assert list_backups("staging", fs=fs) == [missing]

"""The release ledger on a local directory and on S3 (a real moto server)."""

from __future__ import annotations

import json
import re
import threading
import uuid
from pathlib import Path

import pytest
from prefect import flow
from prefect.artifacts import Artifact
from prefect.filesystems import LocalFileSystem, WritableFileSystem
from prefect_aws import AwsCredentials, S3Bucket

from blocks.config import parse_config
from blocks.repository import GitRepository
from blocks.storage import (
    STORAGE_BLOCK,
    ReleaseStorage,
    backup_filesystem,
    ledger_filesystem,
)
from core.errors import (
    ConfigError,
    LedgerConflict,
    LedgerError,
    PromotionRefused,
    UnreviewedCommit,
)
from core.records import DeployedService, DeployOutcome, ImageRef, PromotionPlan, release_id
from core.settings import Settings
from tasks.releases import (
    EnvironmentState,
    Ledger,
    ReleaseRecord,
    build_plan,
    check_reviewed,
    ledger_markdown,
    publish_ledger_artifact,
    record_release,
    with_deploy,
)
from tasks.stores import open_store
from tasks.workspace import prepare_workspace, remove_workspace
from tests.ledgers import current_ledger
from tests.tasks.ci_checkout import bare_remote, git, push_commit
from tests.tasks.plans import D1, D2, PLAN_CONFIG, ledger_state


def image(service: str, hexchar: str) -> ImageRef:
    return ImageRef(
        service=service,
        repository=f"127.0.0.1:5000/elice/{service}",
        digest="sha256:" + hexchar * 64,
    )


def record(service: str, hexchar: str, release: str, env: str = "staging") -> ReleaseRecord:
    return ReleaseRecord(
        service=service, environment=env, image=image(service, hexchar), release_id=release
    )


def make_bucket(endpoint: str, credentials: AwsCredentials) -> str:
    name = f"ledger-{uuid.uuid4().hex[:12]}"
    client = credentials.model_copy(
        update={
            "aws_client_parameters": credentials.aws_client_parameters.model_copy(
                update={"endpoint_url": endpoint}
            )
        }
    ).get_s3_client()
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def fs(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    moto_endpoint: str,
    aws_credentials: AwsCredentials,
) -> WritableFileSystem:
    """The ledger filesystem of both kinds, built through ReleaseStorage."""
    if request.param == "local":
        return ReleaseStorage(path=str(tmp_path)).filesystem("ledger")
    bucket = make_bucket(moto_endpoint, aws_credentials)
    storage = ReleaseStorage(
        kind="s3", bucket=bucket, credentials=aws_credentials, endpoint_url=moto_endpoint
    )
    return storage.filesystem("ledger")


def raw_revision(fs: WritableFileSystem, env: str, revision: int) -> bytes:
    data = open_store(fs).read(f"{env}/{revision:08d}.json")
    assert data is not None
    return data


# --- pure -------------------------------------------------------------------------------


def test_with_deploy_keeps_previous_and_same_digest_keeps_rollback_target() -> None:
    state = EnvironmentState(environment="staging")
    state = with_deploy(state, record("auth", "a", "r1"))
    assert "auth" not in state.previous
    state = with_deploy(state, record("auth", "b", "r2"))
    assert state.services["auth"].release_id == "r2"
    assert state.previous["auth"].release_id == "r1"
    state = with_deploy(state, record("auth", "b", "r3"))  # redeploy of the same digest
    assert state.previous["auth"].release_id == "r1"


def test_ledger_markdown_table() -> None:
    state = with_deploy(EnvironmentState(environment="staging"), record("auth", "a", "r1"))
    state = with_deploy(state, record("auth", "b", "r|2").model_copy(update={"approved_by": "kim"}))
    text = ledger_markdown(state)
    assert "# Release ledger: staging" in text
    row = next(line for line in text.splitlines() if line.startswith("| auth"))
    assert "`bbbbbbbbbbbb`" in row
    assert "r\\|2" in row
    assert "kim" in row
    assert "`aaaaaaaaaaaa` (r1)" in row
    assert "_Nothing deployed._" in ledger_markdown(EnvironmentState(environment="dev"))


def test_bad_input_is_refused_before_any_write(tmp_path: Path) -> None:
    ledger = Ledger(LocalFileSystem(basepath=str(tmp_path)))
    with pytest.raises(ValueError, match="DNS-1123"):
        ledger.current("../etc")
    with pytest.raises(ValueError, match="cannot be written to ledger"):
        ledger.record_deploy("production", record("auth", "a", "r1", env="staging"))
    with pytest.raises(ValueError, match="max_attempts"):
        Ledger(LocalFileSystem(basepath=str(tmp_path)), max_attempts=0)
    with pytest.raises(ValueError, match="bucket"):
        ReleaseStorage(kind="s3")
    assert list(tmp_path.iterdir()) == []


# --- both backends ----------------------------------------------------------------------


def test_ledger_lifecycle(fs: WritableFileSystem) -> None:
    ledger = Ledger(fs)
    empty = ledger.current("staging")
    assert (empty.revision, empty.services, empty.previous) == (0, {}, {})
    assert ledger.history("staging") == []

    first = ledger.record_deploy("staging", record("auth", "a", "r1"))
    second = ledger.record_deploy("staging", record("auth", "b", "r2"))
    assert (first.revision, second.revision) == (1, 2)
    assert second.services["auth"].image.digest.endswith("b" * 64)
    assert second.previous["auth"].release_id == "r1"

    verified = ledger.mark_verified("staging", "auth", {"p95_ms": 12.5}, release_id="r2")
    assert verified.services["auth"].verified
    assert verified.services["auth"].baseline == {"p95_ms": 12.5}
    with pytest.raises(LedgerError, match="not r1"):
        ledger.mark_verified("staging", "auth", None, release_id="r1")
    with pytest.raises(LedgerError, match="nothing serves media"):
        ledger.mark_verified("staging", "media", None)

    rolled = ledger.restore_previous("staging", "auth")
    assert rolled.services["auth"].release_id == "r1"
    assert "auth" not in rolled.previous  # a second rollback cannot flip back to r2
    gone = ledger.restore_previous("staging", "auth")
    assert "auth" not in gone.services
    with pytest.raises(LedgerError, match="nothing to roll back"):
        ledger.restore_previous("staging", "auth")

    assert [s.revision for s in ledger.history("staging")] == [1, 2, 3, 4, 5]
    assert ledger.current("staging") == gone
    # Revisions are immutable files holding exactly what was returned.
    assert json.loads(raw_revision(fs, "staging", 1))["services"]["auth"]["release_id"] == "r1"
    assert EnvironmentState.model_validate_json(raw_revision(fs, "staging", 3)) == verified
    # Environments are separate.
    assert ledger.current("production").revision == 0


def test_revision_files_are_created_exclusively(fs: WritableFileSystem) -> None:
    store = open_store(fs)
    assert store.create("dev/00000001.json", b"first")
    assert not store.create("dev/00000001.json", b"second")
    assert store.read("dev/00000001.json") == b"first"
    assert store.names("dev") == ["00000001.json"]
    assert store.read("dev/00000002.json") is None


def test_lost_race_is_reapplied_on_the_winner(fs: WritableFileSystem) -> None:
    """A competing writer commits revision 1 while our change is being computed."""
    ours, theirs = Ledger(fs, max_attempts=2), Ledger(fs)
    calls: list[int] = []

    def change(state: EnvironmentState) -> EnvironmentState:
        calls.append(state.revision)
        if len(calls) == 1:
            theirs.record_deploy("dev", record("media", "c", "theirs", env="dev"))
        return with_deploy(state, record("auth", "a", "ours", env="dev"))

    result = ours.update("dev", change)
    assert calls == [0, 1]
    assert result.revision == 2
    assert set(result.services) == {"auth", "media"}
    assert [s.revision for s in ours.history("dev")] == [1, 2]


def test_conflict_after_exhausted_attempts_writes_nothing(fs: WritableFileSystem) -> None:
    ours, theirs = Ledger(fs, max_attempts=3), Ledger(fs)

    def always_loses(state: EnvironmentState) -> EnvironmentState:
        theirs.record_deploy("dev", record("media", "c", f"theirs-{state.revision}", env="dev"))
        return with_deploy(state, record("auth", "a", "ours", env="dev"))

    with pytest.raises(LedgerConflict, match="3 attempts"):
        ours.update("dev", always_loses)
    history = ours.history("dev")
    assert [s.revision for s in history] == [1, 2, 3]
    assert all("auth" not in s.services for s in history)


def test_concurrent_writers_all_land_once(tmp_path: Path) -> None:
    """Real threads racing on a local ledger (os.link is atomic).

    Not run against moto: moto 5.2 honours If-None-Match (see the exclusive-create and
    lost-race tests above, which run on S3 too) but checks it without a lock, so truly
    simultaneous PUTs can both succeed there. S3 and MinIO evaluate the condition
    atomically.
    """
    fs = ReleaseStorage(path=str(tmp_path)).filesystem("ledger")
    writers = 6
    barrier = threading.Barrier(writers)
    errors: list[BaseException] = []

    def write(index: int) -> None:
        # A writer can lose at most writers-1 races: max_attempts=writers always succeeds.
        ledger = Ledger(fs, max_attempts=writers)
        barrier.wait()
        try:
            ledger.record_deploy("dev", record(f"svc-{index}", "abcdef"[index], f"r{index}", "dev"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    final = Ledger(fs).current("dev")
    assert final.revision == writers
    assert sorted(final.services) == sorted(f"svc-{i}" for i in range(writers))
    assert [s.revision for s in Ledger(fs).history("dev")] == list(range(1, writers + 1))


def test_corrupt_revision_is_reported(tmp_path: Path) -> None:
    fs = LocalFileSystem(basepath=str(tmp_path))
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "00000001.json").write_text("{not json")
    with pytest.raises(LedgerError, match=r"dev/00000001\.json is corrupt"):
        Ledger(fs).current("dev")


# --- storage selection and the artifact ----------------------------------------------------


def test_storage_defaults_to_local_state_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("ELICE_STORAGE", raising=False)
    monkeypatch.setenv("ELICE_STATE_DIR", str(tmp_path))
    settings = Settings.from_environ()
    ledger_fs, backup_fs = ledger_filesystem(settings), backup_filesystem(settings)
    assert isinstance(ledger_fs, LocalFileSystem)
    assert isinstance(backup_fs, LocalFileSystem)
    assert ledger_fs.basepath == str(tmp_path / "ledger")
    assert backup_fs.basepath == str(tmp_path / "backups")


def test_storage_from_saved_s3_block(
    monkeypatch: pytest.MonkeyPatch, moto_endpoint: str, aws_credentials: AwsCredentials
) -> None:
    bucket = make_bucket(moto_endpoint, aws_credentials)
    ReleaseStorage(
        kind="s3",
        bucket=bucket,
        prefix="elice/prod",
        credentials=aws_credentials,
        endpoint_url=moto_endpoint,
    ).save(STORAGE_BLOCK, overwrite=True)
    monkeypatch.setenv("ELICE_STORAGE", "blocks")
    try:
        fs = ledger_filesystem(Settings.from_environ())
        assert isinstance(fs, S3Bucket)
        assert fs.bucket_folder == "elice/prod/ledger"
        current_ledger().record_deploy("production", record("auth", "a", "r1", env="production"))
        keys = [
            o["Key"]
            for o in fs.credentials.get_s3_client().list_objects_v2(Bucket=bucket)["Contents"]
        ]
        assert keys == ["elice/prod/ledger/production/00000001.json"]
    finally:
        ReleaseStorage.delete(STORAGE_BLOCK)
    with pytest.raises(ConfigError, match="cannot be loaded"):
        ledger_filesystem(Settings.from_environ())


def test_publish_ledger_artifact(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ELICE_STORAGE", raising=False)
    monkeypatch.setenv("ELICE_STATE_DIR", str(tmp_path))
    current_ledger().record_deploy("staging", record("auth", "d", "r7"))

    @flow
    def publish() -> str:
        return publish_ledger_artifact(ledger_filesystem(Settings.from_environ()), "staging")

    publish()
    artifact = Artifact.get("ledger-staging")
    assert artifact is not None
    assert artifact.type == "markdown"
    assert "`dddddddddddd`" in str(artifact.data)
    assert "r7" in str(artifact.data)


# --- planning a promotion from the ledgers (pure) ---------------------------------------


def test_build_plan_refuses_before_anything_changes() -> None:
    cfg = parse_config(PLAN_CONFIG, "test")
    dev = ledger_state("q-dev", auth=(D1, True, "clean"), course=(D2, False, "clean"))
    prod = ledger_state("q-prod")
    cases = {
        "unknown environment 'nowhere'": ("nowhere", ["auth"], "bob"),
        "unknown services ['nope']": ("q-prod", ["nope"], "bob"),
        "course: release ci-1 (222222222222) is not verified in q-dev": ("q-prod", None, "bob"),
        "q-dev is not promoted into": ("q-dev", ["auth"], "bob"),
    }
    for message, (env, services, who) in cases.items():
        with pytest.raises(PromotionRefused, match=re.escape(message)):
            build_plan(cfg, env, services, who, dev, prod)
    ok = build_plan(cfg, "q-prod", ["auth"], "bob", dev, prod)
    assert ok.services == ["auth"]
    assert ok.changes[0].current_digest is None
    assert ok.release_id == release_id({"auth": D1})
    assert ok.changes[0].ref == "refs/heads/main"


def test_a_release_not_shipped_from_the_protected_branch_is_refused() -> None:
    cfg = parse_config(PLAN_CONFIG, "test")
    dev = ledger_state("q-dev", auth=(D1, True, "clean"))
    planted = dev.services["auth"].model_copy(update={"ref": "refs/heads/feature"})
    dev = dev.model_copy(update={"services": {"auth": planted}})
    with pytest.raises(PromotionRefused, match="not shipped from the protected branch main"):
        build_plan(cfg, "q-prod", ["auth"], "bob", dev, ledger_state("q-prod"))
    with pytest.raises(PromotionRefused, match="protected branch release"):
        build_plan(
            cfg,
            "q-prod",
            ["auth"],
            "bob",
            ledger_state("q-dev", auth=(D1, True, "clean")),
            ledger_state("q-prod"),
            protected_branch="release",
        )


# --- releases bound to reviewed commits (a real bare remote, force-pushed) ---------------


def _deployed(commit: str) -> DeployOutcome:
    service = DeployedService(
        service="auth",
        environment="q-dev",
        image=ImageRef(
            service="auth",
            repository="127.0.0.1:5000/elice/auth",
            digest=D1,
            version="1.0.0",
            commit=commit,
        ),
        address="http://127.0.0.1:18002",
    )
    return DeployOutcome(deployed=service, changed=True)


def test_a_commit_force_pushed_off_main_after_its_checkout_is_not_recorded(
    tmp_path: Path,
) -> None:
    bare, clone = bare_remote(tmp_path)
    repository = GitRepository(url=str(bare), name="elice/monorepo")
    store = LocalFileSystem(basepath=str(tmp_path / "ledger"))
    base = git(clone, "rev-parse", "HEAD").strip()
    pushed = push_commit(clone, "b.txt", "merged, then force-pushed away\n")
    workspace = prepare_workspace.fn(repository, pushed)
    assert workspace.protected  # on main when it was checked out...
    git(clone, "push", "-q", "--force", "origin", f"{base}:refs/heads/main")
    try:
        with pytest.raises(UnreviewedCommit) as refused:  # ...and not when it is recorded
            record_release.fn(_deployed(pushed), None, workspace, store, repository)
    finally:
        remove_workspace.fn(workspace)
    assert f"commit {pushed} is not on main of elice/monorepo" in str(refused.value)
    assert Ledger(store).current("q-dev").revision == 0
    reviewed = prepare_workspace.fn(repository, base)
    try:
        entry = record_release.fn(_deployed(base), None, reviewed, store, repository)
    finally:
        remove_workspace.fn(reviewed)
    assert (entry.revision, entry.changed) == (1, True)
    recorded = Ledger(store).current("q-dev").services["auth"]
    assert (recorded.commit, recorded.ref, recorded.repository) == (
        base,
        "refs/heads/main",
        "elice/monorepo",
    )


def test_a_plan_is_checked_commit_by_commit_against_the_protected_branch(
    tmp_path: Path,
) -> None:
    bare, clone = bare_remote(tmp_path)
    repository = GitRepository(url=str(bare), name="elice/monorepo")
    reviewed = git(clone, "rev-parse", "HEAD").strip()
    git(clone, "checkout", "-q", "-b", "feature")
    unreviewed = push_commit(clone, "f.txt", "never merged\n", branch="feature")
    cfg = parse_config(PLAN_CONFIG, "test")
    dev = ledger_state("q-dev", auth=(D1, True, "clean"), course=(D2, True, "clean"))
    prod = ledger_state("q-prod")

    def plan_of(**commits: str) -> PromotionPlan:
        records = {
            name: record.model_copy(update={"commit": commits[name]})
            for name, record in dev.services.items()
        }
        source = dev.model_copy(update={"services": records})
        return build_plan(cfg, "q-prod", None, "bob", source, prod)

    ok = plan_of(auth=reviewed, course=reviewed)
    assert check_reviewed.fn(ok, repository) == ok
    with pytest.raises(PromotionRefused) as refused:
        check_reviewed.fn(plan_of(auth=reviewed, course=unreviewed), repository)
    assert str(refused.value) == (
        "refusing to promote into q-prod: course (222222222222): "
        f"commit {unreviewed} is not on main of elice/monorepo"
    )
    with pytest.raises(PromotionRefused, match=r"auth \(111111111111\): no commit recorded"):
        check_reviewed.fn(plan_of(auth="", course=reviewed), repository)

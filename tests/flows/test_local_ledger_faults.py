"""The local ledger's disk failing during a promotion, after the deploys started: the
environment's ledger directory is a real small tmpfs, filled up (ENOSPC) or remounted
read-only once the promotion has written its intent.

What must hold: the verified release cannot be recorded, so every service goes back and
is checked; the error keeps the disk's own complaint as its cause and adds that the
rollback could not be recorded; the intent ("under way") stays on record, and the next
promotion, the disk writable again, finds it, checks what serves and promotes.
Own environments (ll-dev -> ll-stg, host port offsets 16100/16600).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest
from prefect.client.schemas.objects import State
from prefect.filesystems import LocalFileSystem

from blocks.config import PipelineConfig, load_config
from blocks.stack import StackInfo
from blocks.storage import ledger_filesystem
from core.errors import PromotionRolledBack
from core.records import ImageRef, PromotionOutcome
from core.settings import Settings
from flows.promotion import promote
from tasks.releases import EnvironmentState
from tests.flows.chain import SERVICES, derive, put_verified, remove_containers, write_chain_config
from tests.flows.test_promotion_faults import serving
from tests.ledgers import current_ledger

DEV, STG = "ll-dev", "ll-stg"


def _fill(disk: Path) -> None:
    """Write a filler file until the disk says it is full."""
    fd = os.open(disk / ".filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unfill(disk: Path) -> None:
    (disk / ".filler").unlink()


def _read_only(disk: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)


def _writable(disk: Path) -> None:
    subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)


FAULTS = {
    "full": (_fill, _unfill, "No space left on device"),
    "read-only": (_read_only, _writable, "Read-only file system"),
}


@pytest.fixture
def releases(
    tmp_path: Path,
    stack: StackInfo,
    docker_client: docker.DockerClient,
    pushed_image: ImageRef,
) -> Iterator[tuple[PipelineConfig, str, ImageRef, ImageRef, Path]]:
    """ll-stg serves D1 of both services, ll-dev holds a verified D2; ll-stg's ledger
    directory is a 1 MiB tmpfs of its own (mounted before its first revision)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DOCKER_HOST", stack.docker_host)
    store = ledger_filesystem(Settings.from_environ())
    assert isinstance(store, LocalFileSystem), "this module is about the local ledger"
    disk = Path(str(store.basepath)) / STG
    disk.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)]
    mounted = subprocess.run(mount, check=False)
    if mounted.returncode != 0:
        pytest.fail("mounting a tmpfs needs root (CI runs as root)")
    cfg_path = write_chain_config(tmp_path / "pipeline.yaml", [(DEV, 16100), (STG, 16600)])
    cfg = load_config(cfg_path)
    remove_containers(docker_client, [DEV, STG])
    d2 = derive(docker_client, pushed_image, "local-ledger-fault")
    try:
        for service in SERVICES:
            put_verified(cfg, STG, service, pushed_image)
            put_verified(cfg, DEV, service, d2)
        yield cfg, cfg_path, pushed_image, d2, disk
    finally:
        remove_containers(docker_client, [DEV, STG])
        subprocess.run(["umount", "-l", str(disk)], check=True)
        mp.undo()


def _once_under_way(then: Callable[[], None]) -> threading.Thread:
    """Call `then` once the ledger says a deploy into STG is under way."""

    def watch() -> None:
        end = time.monotonic() + 300
        while current_ledger().current(STG).in_progress is None:
            if time.monotonic() > end:
                return
            time.sleep(0.05)
        then()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


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


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_local_ledger_that_fails_after_the_intent_leaves_the_old_release_and_the_intent(
    releases: tuple[PipelineConfig, str, ImageRef, ImageRef, Path], fault: str
) -> None:
    cfg, cfg_path, d1, d2, disk = releases
    break_disk, mend_disk, complaint = FAULTS[fault]
    before = current_ledger().current(STG)
    broken: list[bool] = []

    def strike() -> None:
        break_disk(disk)
        broken.append(True)

    watcher = _once_under_way(strike)
    try:
        state = _promote(cfg_path)
        watcher.join(timeout=5)
        assert broken, "the deploy phase never started"
        assert state.is_failed(), state.message
        error = state.result(raise_on_failure=False)
        assert isinstance(error, PromotionRolledBack), repr(error)
        assert error.plan is not None
        assert complaint in error.failed  # the record's failure is the cause
        assert str(disk) in error.failed
        assert "the ledger could not record the rollback" in str(error)
        assert error.restored == dict.fromkeys(SERVICES, d1.digest)
        assert serving(cfg, STG) == dict.fromkeys(SERVICES, d1.digest)
        after = current_ledger().current(STG)  # readable, the old release, the intent
        assert _recorded(after) == _recorded(before)
        assert after.in_progress is not None
        assert after.in_progress.release_id == error.plan.release_id
    finally:
        mend_disk(disk)

    second = _promote(cfg_path)
    assert second.is_completed(), second.message
    final = current_ledger().current(STG)
    assert final.in_progress is None
    assert _recorded(final) == dict.fromkeys(SERVICES, d2.digest)
    changes = [s.change for s in current_ledger().history(STG)]
    assert any(f"died deploying release {error.plan.release_id}" in c for c in changes)
    assert serving(cfg, STG) == dict.fromkeys(SERVICES, d2.digest)

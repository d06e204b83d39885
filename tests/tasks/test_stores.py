"""The ledger's stores turn every failure of their medium into a LedgerError with its cause:
a full disk, a read-only file system, an S3 endpoint that does not answer."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.filesystems import LocalFileSystem
from prefect_aws import AwsCredentials

from blocks.storage import ReleaseStorage
from core.errors import LedgerError
from tasks.stores import open_store


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB tmpfs: the disk fills up for real."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], check=False
    )
    if mounted.returncode != 0:
        pytest.fail("mounting a tmpfs needs root (CI runs as root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def test_a_full_disk_is_a_ledger_error_and_leaves_nothing_half_written(tiny_disk: Path) -> None:
    store = open_store(LocalFileSystem(basepath=str(tiny_disk)))
    assert store.create("dev/00000001.json", b"{}")
    with pytest.raises(LedgerError, match="No space left on device"):
        store.create("dev/00000002.json", b"x" * 200_000)
    assert store.names("dev") == ["00000001.json"]
    assert store.read("dev/00000001.json") == b"{}"


def test_a_read_only_store_is_a_ledger_error(tiny_disk: Path) -> None:
    store = open_store(LocalFileSystem(basepath=str(tiny_disk)))
    assert store.create("dev/00000001.json", b"{}")
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    with pytest.raises(LedgerError, match="Read-only file system"):
        store.create("dev/00000002.json", b"{}")
    with pytest.raises(LedgerError, match="Read-only file system"):
        store.create("staging/00000001.json", b"{}")
    assert store.read("dev/00000001.json") == b"{}"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_s3_endpoint_is_a_ledger_error(aws_credentials: AwsCredentials) -> None:
    # One attempt per call, the way a block sets its own budget (its credentials' client
    # config): the project's default (tasks/stores.py CLIENT_CONFIG, six attempts with
    # backoff) would make this test wait half a minute per call.
    params = aws_credentials.aws_client_parameters.model_copy(
        update={"config": {"retries": {"mode": "standard", "total_max_attempts": 1}}}
    )
    storage = ReleaseStorage(
        kind="s3",
        bucket="elice-ledger",
        credentials=aws_credentials.model_copy(update={"aws_client_parameters": params}),
        endpoint_url=f"http://127.0.0.1:{_closed_port()}",
    )
    store = open_store(storage.filesystem("ledger"))
    assert store.client.meta.config.retries["total_max_attempts"] == 1  # type: ignore[attr-defined]
    for call in (
        lambda: store.read("dev/00000001.json"),
        lambda: store.create("dev/00000001.json", b"{}"),
        lambda: store.names("dev"),
    ):
        with pytest.raises(LedgerError, match="Could not connect to the endpoint URL"):
            call()

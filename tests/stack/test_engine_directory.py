"""The engine's directories: one whose working directory was removed is restarted, not
reused; its temporary files stay in the stack's directory.

Seen: the stack's Podman service was started from a checkout that was removed later. It
still answered pings, but conmon, which inherits its directory, could start no container
("Failed to get working directory", "write child: broken pipe"), and every deploy failed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import docker

from blocks.stack import StackInfo
from core.records import ImageRef
from stack.engine import directory_gone, engine_tmp
from tests.flows.chain import derive


def test_a_process_whose_directory_was_removed_is_told_apart(tmp_path: Path) -> None:
    kept, removed = tmp_path / "kept", tmp_path / "removed"
    kept.mkdir()
    removed.mkdir()
    procs = [subprocess.Popen(["sleep", "30"], cwd=where) for where in (kept, removed)]
    try:
        shutil.rmtree(removed)
        assert not directory_gone(procs[0].pid)
        assert directory_gone(procs[1].pid)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert not directory_gone(None)
    assert not directory_gone(procs[0].pid)  # ended: nothing to restart for


def test_the_engines_leftover_temporary_files_are_swept_after_an_hour(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    old, fresh, other = tmp / "digest.txt1", tmp / "digest.txt2", tmp / "layer-copy"
    for path in (old, fresh, other):
        path.write_text("sha256:0\n")
    two_hours_ago = time.time() - 7200
    for path in (old, other):
        os.utime(path, (two_hours_ago, two_hours_ago))
    assert engine_tmp(tmp_path) == tmp.absolute()
    assert sorted(p.name for p in tmp.iterdir()) == ["digest.txt2", "layer-copy"]


def test_a_push_through_the_engine_leaves_nothing_in_the_machines_tmp(
    stack: StackInfo, docker_client: docker.DockerClient, pushed_image: ImageRef
) -> None:
    """Podman 4.3 leaves a `digest.txt<N>` for every push through its API; the stack's
    engine keeps them in the stack's own directory (where they are swept), not /var/tmp."""
    before = set(Path("/var/tmp").glob("digest.txt*"))
    derive(docker_client, pushed_image, f"tmp-{uuid.uuid4().hex[:8]}")
    assert set(Path("/var/tmp").glob("digest.txt*")) - before == set()
    home = Path(stack.docker_host.removeprefix("unix://")).parent
    assert list((home / "tmp").glob("digest.txt*")), "the push wrote its digest elsewhere"

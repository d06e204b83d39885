"""An engine whose working directory was removed is restarted, not reused.

Seen: the stack's Podman service was started from a checkout that was removed later. It
still answered pings, but conmon, which inherits its directory, could start no container
("Failed to get working directory", "write child: broken pipe"), and every deploy failed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from stack.engine import directory_gone


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

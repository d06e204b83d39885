"""The one process supervisor (stack/supervisor.py): liveness, pid files, stopping a tree.

Real processes throughout; `proc=` points `alive` at a directory standing for /proc to
decide the two cases the stack and the worker once answered differently.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from stack.supervisor import (
    alive,
    cmdline,
    descendants,
    pid_file,
    proc_stat,
    reap,
    recorded_pid,
    running_part,
    spawn_part,
    start_time,
    stop_part,
)
from stack.worker import stop_worker, worker_pid

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.fixture(scope="session", autouse=True)
def prefect_server() -> None:
    """Overrides the conftest's: processes and pid files only, no Prefect server."""


def _wait(what: str, condition: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_running_process_is_alive_and_an_exited_child_is_not() -> None:
    proc = subprocess.Popen(SLEEPER)
    try:
        assert alive(proc.pid)
    finally:
        proc.kill()
    # not reaped by Popen: a zombie until `alive` reaps it, keeping its exit code
    _wait("the zombie", lambda: (proc_stat(proc.pid) or ["Z"])[0] == "Z")
    assert not alive(proc.pid)
    assert reap(proc.pid) == -9
    assert not alive(proc.pid)


def test_a_parts_exit_code_survives_other_processes_starting(tmp_path: Path) -> None:
    """A part that exits at once: its code stays readable, even after other processes were
    started meanwhile (the subprocess module reaps dropped children it knows of)."""
    pid = spawn_part(tmp_path, "quits", [sys.executable, "-c", "raise SystemExit(3)"])
    _wait("the exit", lambda: running_part(tmp_path, "quits") is None)
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert recorded_pid(tmp_path, "quits") == pid
    assert reap(pid) == 3


def test_without_a_proc_entry_a_pid_is_dead_where_proc_is_mounted(tmp_path: Path) -> None:
    """The kernel knows the pid (this process), but a mounted /proc has no entry for it:
    the process exited between the two looks, so it is dead."""
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "stat").write_text("1 (x) R 0\n", encoding="ascii")
    assert not alive(os.getpid(), proc=tmp_path)


def test_without_proc_at_all_the_kernels_answer_stands(tmp_path: Path) -> None:
    """No /proc (not Linux): kill(pid, 0) decides, so a live process stays alive."""
    proc = subprocess.Popen(SLEEPER)
    try:
        assert alive(proc.pid, proc=tmp_path)
    finally:
        proc.kill()
        proc.wait()


def test_a_pid_file_naming_a_reused_pid_is_not_the_part(tmp_path: Path) -> None:
    pid = spawn_part(tmp_path, "sleeper", SLEEPER)
    try:
        assert running_part(tmp_path, "sleeper") == pid
        recorded = pid_file(tmp_path, "sleeper").read_text().split()
        assert recorded == [str(pid), str(start_time(pid))]
        pid_file(tmp_path, "sleeper").write_text(f"{pid} 1\n", encoding="ascii")
        assert running_part(tmp_path, "sleeper") is None  # another process's start time
        pid_file(tmp_path, "sleeper").write_text(" ".join(recorded), encoding="ascii")
        assert stop_part(tmp_path, "sleeper")
    finally:
        stop_part(tmp_path, "sleeper")
    assert not alive(pid)
    assert not pid_file(tmp_path, "sleeper").exists()
    assert not stop_part(tmp_path, "sleeper")


def test_stopping_a_tree_reaches_processes_in_sessions_of_their_own(tmp_path: Path) -> None:
    """A part whose child started a session of its own (as a worker's flow runs do):
    `tree=True` stops that child too."""
    script = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
        " start_new_session=True)\n"
        "time.sleep(60)\n"
    )
    pid = spawn_part(tmp_path, "parent", [sys.executable, "-c", script])
    _wait("the child", lambda: len(descendants(pid)) == 1)
    child = descendants(pid)[0]
    assert stop_part(tmp_path, "parent", deadline_s=5, tree=True)
    assert not alive(pid)
    assert not alive(child)


def test_the_worker_is_a_part_of_the_same_supervisor(tmp_path: Path) -> None:
    """`worker_pid` reads the part's pid file (with its command line as one more check),
    `stop_worker` stops it through the supervisor."""
    pid = spawn_part(tmp_path, "worker", [*SLEEPER, "stack.trusted_worker", "start"])
    try:
        # the kernel sets the new command line up just after the exec Popen waits for
        _wait("its command line", lambda: bool(cmdline(pid)))
        assert worker_pid(tmp_path) == pid == running_part(tmp_path, "worker")
        assert stop_worker(tmp_path, deadline_s=5)
    finally:
        stop_part(tmp_path, "worker")
    assert not alive(pid)
    assert worker_pid(tmp_path) is None
    other = spawn_part(tmp_path, "worker", SLEEPER)  # the pid file names no worker
    try:
        assert running_part(tmp_path, "worker") == other
        assert worker_pid(tmp_path) is None
    finally:
        stop_part(tmp_path, "worker")

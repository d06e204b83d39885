"""Processes the tests start end with the test process, also when it is SIGKILLed and
runs no teardown (tests/plugins/lifetime.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.plugins.lifetime import stop, tied

STARTER = """
import subprocess, sys
from tests.plugins.lifetime import tied
user = sys.argv[1] or None
child = subprocess.Popen(tied(["sleep", "300"], user=user))
print(child.pid, flush=True)
sys.stdin.read()  # until the test kills this process
"""


HARNESS = """
import sys
from prefect.testing.utilities import prefect_test_harness
from tests.plugins.lifetime import harness_server_pid, reaped
with prefect_test_harness(server_startup_timeout=300):
    pid = harness_server_pid()
    with reaped(pid):
        print(pid, flush=True)
        sys.stdin.read()
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _command(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        return cmdline.read().replace(b"\0", b" ").decode().strip()


def _killed_leaves_no(starter: subprocess.Popen[str], pid: int) -> None:
    """SIGKILL `starter`: `pid` must end within 10 s (killed here if not, then failed)."""
    starter.send_signal(signal.SIGKILL)
    starter.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
        pytest.fail(f"{_command(pid)!r} ({pid}) outlived the killed process that started it")


def _start(script: str, *args: str) -> tuple[subprocess.Popen[str], int]:
    starter = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.getcwd(),
    )
    assert starter.stdout is not None
    return starter, int(starter.stdout.readline())


@pytest.mark.parametrize("user", ["", "nobody"], ids=["same-user", "as-another-user"])
def test_a_tied_process_ends_when_the_test_process_is_killed(user: str) -> None:
    if user and os.geteuid() != 0:
        pytest.fail("running a tied process as another user needs root (as the suite runs)")
    starter, pid = _start(STARTER, user)
    deadline = time.monotonic() + 10
    while _command(pid) != "sleep 300" and time.monotonic() < deadline:
        time.sleep(0.05)  # setpriv has set it up and run the command in its place
    assert _command(pid) == "sleep 300"
    if user:
        assert os.stat(f"/proc/{pid}").st_uid != 0  # it runs as that user
    _killed_leaves_no(starter, pid)


@pytest.mark.slow
def test_the_harness_server_ends_when_the_test_process_is_killed() -> None:
    """The session's Prefect server (started by Prefect's harness, so not `tied`)."""
    starter, pid = _start(HARNESS)
    assert "uvicorn" in _command(pid)
    _killed_leaves_no(starter, pid)


def test_fixtures_run_in_the_main_thread_so_their_processes_are_tied() -> None:
    """xdist runs tests in each worker's main thread: what the fixtures start is tied."""
    assert threading.current_thread() is threading.main_thread()
    assert "--pdeathsig=TERM" in tied(["true"])


def test_a_process_started_from_another_thread_is_not_tied() -> None:
    """Tied to a thread that ends, it would be stopped at once (a test restarts the API
    server from a thread beside a rollout, and the session goes on using it)."""
    found: list[list[str]] = []
    thread = threading.Thread(target=lambda: found.append(tied(["true"])))
    thread.start()
    thread.join()
    assert "--pdeathsig=clear" in found[0]


def test_stop_kills_a_server_that_ignores_its_shutdown_signal() -> None:
    """A server that does not exit on its shutdown signal is killed after the timeout."""
    stubborn = subprocess.Popen(
        ["sh", "-c", 'trap "" TERM; echo up; exec sleep 300'], stdout=subprocess.PIPE
    )
    assert stubborn.stdout is not None
    assert stubborn.stdout.readline() == b"up\n"
    started = time.monotonic()
    stop(stubborn, timeout=0.5)
    assert stubborn.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 10


def test_stop_with_group_ends_children_that_outlive_the_leader() -> None:
    """`group=True`: a child the leader leaves behind (its own SIGTERM ignored) goes too."""
    script = "sh -c 'trap \"\" TERM; sleep 300' & echo $!; wait"
    leader = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, start_new_session=True)
    assert leader.stdout is not None
    child = int(leader.stdout.readline())
    stop(leader, timeout=5, group=True)
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the leader's child outlived stop(group=True)"
    assert leader.returncode is not None

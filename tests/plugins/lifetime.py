"""Processes that end with the test process that started them.

A test run stopped by SIGKILL (a timeout's kill, an interrupted CI job, a developer's
`kill -9`) runs no fixture teardown: the Kubernetes control planes, PostgreSQL clusters,
registries, Prometheus and Prefect servers it started were left running with PID 1 as
their parent, one set per killed run, each using CPU (seen: three control planes and four
PostgreSQL servers, up to 1.5 h each) beside every later run on the machine.

`tied(argv)` prefixes a command with util-linux's `setpriv --pdeathsig`: the kernel sends
the process `signal` when the thread that started it ends (`PR_SET_PDEATHSIG`), which the
process keeps across its exec. The signal follows the thread, not the process, so only a
process started from the main thread (pytest's, which lives as long as the session) is
tied; one started from another thread (a test restarting the API server from a thread
beside a rollout) is not, or it would be stopped as soon as that thread ends. A process a
tied one forks is not tied itself: each server here ends its own children on the signal.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal as signals
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from prefect.server.api.server import SubprocessASGIServer


def tied(argv: list[str], signal: str = "TERM", *, user: str | None = None) -> list[str]:
    """`argv` run so it receives SIG`signal` when the test process dies (when called from
    the main thread: see the module's docstring); `user`: run it as that user (with its
    primary group), as `runuser -u` would, the death signal kept."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("`setpriv` (util-linux) is needed to tie test servers to the test process")
    main = threading.current_thread() is threading.main_thread()
    prefix = [setpriv, f"--pdeathsig={signal}" if main else "--pdeathsig=clear"]
    if user is not None:
        group = pwd.getpwnam(user).pw_gid
        prefix += [f"--reuid={user}", f"--regid={group}", "--init-groups"]
    return [*prefix, "--", *argv]


def harness_server_pid() -> int:
    """The process of the server `prefect_test_harness` started (call it inside the
    harness); Prefect keeps it under two keys, its port and None."""
    servers = [s.server_process for s in SubprocessASGIServer._instances.values()]
    started = sorted({p.pid for p in servers if p is not None})
    assert len(started) == 1, f"expected the harness's one server process, found {started}"
    return started[0]


def stop(
    proc: subprocess.Popen[bytes],
    signal: signals.Signals = signals.SIGTERM,
    *,
    timeout: float = 10.0,
    group: bool = False,
) -> None:
    """End a server the tests started: `signal` (the server's own clean shutdown), then
    SIGKILL if it has not exited within `timeout`. `group`: signal the process group it
    leads (a server started in its own session whose children may outlive it), and
    SIGKILL the group after, whatever the leader did."""

    def send(sig: signals.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, sig)
            else:
                os.kill(proc.pid, sig)

    if proc.poll() is None:
        send(signal)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    if group or proc.poll() is None:
        send(signals.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


@contextmanager
def reaped(pid: int) -> Iterator[None]:
    """While inside, `pid` gets SIGTERM if the test process dies: for a process that code
    outside the project starts (Prefect's test harness server), which `tied` cannot
    prefix. A tied shell waits for its own death signal and passes it on."""
    script = 'trap "kill -TERM $1 2>/dev/null; exit 0" TERM; while :; do sleep 1; done'
    reaper = subprocess.Popen(
        tied(["sh", "-c", script, "reaper", str(pid)]), stdin=subprocess.DEVNULL
    )
    try:
        yield
    finally:
        reaper.kill()
        reaper.wait(timeout=10)

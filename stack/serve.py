"""Starting a served part and waiting until it answers: reuse one that runs and answers on
its recorded port, else start it on a free port, with its log's last lines when it fails."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from pathlib import Path

from core.errors import StackError
from stack.ports import choose_port, free_port, part_listens, port_free, port_holder
from stack.probe import monitor_alive, monitor_up
from stack.steps import Steps
from stack.supervisor import (
    part_log,
    part_log_tail,
    pid_file,
    reap,
    recorded_pid,
    running_part,
    spawn_part,
    stop_part,
)

# A running part of ours that holds its address gets this long to answer before a restart.
REUSE_PATIENCE_S = 10.0


def reusable(listens: Callable[[], bool], answers: Callable[[], bool], patience_s: float) -> bool:
    """A part that is ours and holds its address is reused when it answers; a busy one
    gets `patience_s` seconds to answer before it counts as down."""
    if not listens():
        return False
    end = time.monotonic() + patience_s
    while not answers():
        if time.monotonic() >= end:
            return False
        time.sleep(0.5)
    return True


def _exit_code(pid: int | None, patience_s: float = 2.0) -> int | None:
    """The exit code of a part seen gone: on a loaded machine the process may be seen
    exiting a moment before its parent can collect the code."""
    end = time.monotonic() + patience_s
    while pid is not None:
        code = reap(pid)
        if code is not None or time.monotonic() > end:
            return code
        time.sleep(0.05)
    return None


def wait_up(root: Path, name: str, what: str, up: Callable[[], bool], deadline_s: float) -> None:
    """Wait until `up()`. A part that exits, or does not answer in time (then it is
    stopped), fails with the last lines of its log.

    Raises:
        StackError: naming the part, how it failed, its log and the log's last lines.
    """
    pid = recorded_pid(root, name)
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if up():
            return
        if running_part(root, name) is None:
            code = _exit_code(pid)
            pid_file(root, name).unlink(missing_ok=True)
            how = "exited" if code is None else f"exited with code {code}"
            msg = f"{what} {how} before it answered"
            raise StackError(with_log(msg, root, name))
        time.sleep(0.3)
    stop_part(root, name)
    msg = f"{what} did not answer within {deadline_s:.0f}s (stopped it)"
    raise StackError(with_log(msg, root, name))


def with_log(message: str, root: Path, name: str) -> str:
    tail = part_log_tail(root, name) or "(nothing)"
    return f"{message}; last lines of {part_log(root, name)}:\n{tail}"


def start_on_port(
    root: Path,
    name: str,
    what: str,
    port: int,
    note: str,
    command: Callable[[int], tuple[list[str], dict[str, str]]],
    up: Callable[[int], bool],
    deadline_s: float,
    steps: Steps,
) -> int:
    """Start part `name` on `port` and wait until it is up there; returns the port.

    When it fails because another process took the port meanwhile, it starts once more
    on another free port.
    """
    retried = False
    while True:
        args, env = command(port)
        where = f"{what} on 127.0.0.1:{port}" + (f" ({note})" if note else "")
        started = steps.start(name, f"starting {where}")
        spawn_part(root, name, args, env)
        try:
            wait_up(root, name, what, functools.partial(up, port), deadline_s)
        except StackError:
            steps.failed(name, started)
            if retried or port_free(port):
                raise
            retried = True
            note = f"127.0.0.1:{port} was taken{port_holder(port)} meanwhile"
            port = free_port()
            continue
        steps.done(name, started)
        return port


def ensure_served(
    root: Path,
    name: str,
    what: str,
    recorded: int | None,
    preferred: int | None,
    changed: bool,
    command: Callable[[int], tuple[list[str], dict[str, str]]],
    deadline_s: float,
    steps: Steps,
) -> int:
    """Part `name` on its recorded port when it runs there, answers, and its configuration
    did not change; else (re)started, on another port when that one is taken."""
    if recorded is not None and reusable(
        functools.partial(part_listens, root, name, port=recorded),
        functools.partial(monitor_alive, name, recorded),
        REUSE_PATIENCE_S,
    ):
        if not changed:
            pid = running_part(root, name)
            steps.info(name, f"running at 127.0.0.1:{recorded} (pid {pid})")
            return recorded
        steps.info(name, "its configuration changed: restarting")
    stop_part(root, name)
    port, note = choose_port(recorded, preferred)
    return start_on_port(
        root,
        name,
        what,
        port,
        note,
        command,
        functools.partial(monitor_up, root, name),
        deadline_s,
        steps,
    )


def private_log(root: Path, name: str) -> None:
    """Part `name`'s log readable by its owner only (it may name a receiver)."""
    path = part_log(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    path.chmod(0o600)

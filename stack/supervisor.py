"""The one process supervisor of the stack: every long-running part, the worker included.

A part is a process started detached in its own session (`spawn_part`), with a pid file
(`<root>/pids/<name>.pid`: the pid and the process's start time, so a pid the kernel has
since given to another process is not taken for the part) and a log (`<root>/logs/<name>.log`,
each start appended after a marker line). `running_part` tells whether it still runs,
`stop_part` stops it (its session, and with `tree=True` every process below it too: a
worker's flow runs start sessions of their own).

Liveness (`alive`) is decided in one place: a pid is alive while the kernel knows it
(`kill(pid, 0)`) and /proc does not show it exited (a zombie). Where /proc is not mounted at
all (not Linux), the kernel's answer stands; where /proc is mounted but has no entry for the
pid, the process exited between the two looks: dead. Our own exited children are reaped on
the way, and their exit codes kept for `reap`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from core.errors import StackError

PROC = Path("/proc")
LOG_TAIL_LINES = 25
_START_MARK = "--- elice stack: starting"
_exit_codes: dict[int, int] = {}
# The parts this process started: kept, so their exit codes stay readable (a dropped Popen
# may be reaped by the subprocess module's own cleanup, and its code lost with it).
_children: dict[int, subprocess.Popen[bytes]] = {}


@contextlib.contextmanager
def locked(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the exclusive file lock `path` (created when missing); `on_wait` is called once
    when another process holds it and this one has to wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- one process -------------------------------------------------------------------------


def proc_stat(pid: int, proc: Path = PROC) -> list[str] | None:
    """/proc/PID/stat after the command name (state, ppid, pgrp, session, ...), or None."""
    try:
        text = (proc / str(pid) / "stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    return text.rsplit(") ", 1)[-1].split()


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc), or None."""
    stat = proc_stat(pid)
    return stat[19] if stat is not None and len(stat) > 19 else None


def reap(pid: int) -> int | None:
    """The exit code of our exited child `pid` (reaping it, or as reaped before), else None."""
    child = _children.get(pid)
    if child is not None:
        return child.poll()
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return _exit_codes.get(pid)
    if not done:
        return None
    _exit_codes[pid] = os.waitstatus_to_exitcode(status)
    return _exit_codes[pid]


def alive(pid: int, proc: Path = PROC) -> bool:
    """True while `pid` exists and has not exited (a zombie has); see the module's doc."""
    reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user's process
    stat = proc_stat(pid, proc)
    if stat is None:
        return not (proc / "self" / "stat").exists()
    return stat[0] not in {"Z", "X"}


def cmdline(pid: int) -> list[str]:
    """The process's command line (/proc), or [] when it cannot be read."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def environ(pid: int) -> dict[str, str]:
    """The process's environment as it started (/proc), or {} when it cannot be read."""
    try:
        raw = (PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {key: value for key, _, value in pairs}


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children, grandchildren, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in PROC.glob("[0-9]*"):
        stat = proc_stat(int(entry.name))
        if stat is not None and len(stat) > 1:
            children.setdefault(int(stat[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:  # a group leader: a part, or a flow run's own session
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def terminate(pid: int, deadline_s: float, *, tree: bool = False) -> None:
    """Stop `pid` and its process group (TERM, then KILL after `deadline_s`); with `tree`,
    every process below it too (processes that started sessions of their own).

    Raises:
        StackError: a process survived SIGKILL.
    """
    known = {pid, *(descendants(pid) if tree else ())}
    for sig, wait in ((signal.SIGTERM, deadline_s), (signal.SIGKILL, 5.0)):
        if tree and alive(pid):
            known |= set(descendants(pid))
        for member in sorted(known):
            _signal(member, sig)
        end = time.monotonic() + wait
        while time.monotonic() < end:
            known = {p for p in known if alive(p)}
            if not known:
                return
            time.sleep(0.2)
    msg = f"processes {sorted(known)} survived SIGKILL"
    raise StackError(msg)


# --- parts -------------------------------------------------------------------------------


def pid_file(root: Path, name: str) -> Path:
    """Where part `name`'s pid and start time are recorded."""
    return root / "pids" / f"{name}.pid"


def part_log(root: Path, name: str) -> Path:
    """The log file of part `name`; every start appends to it after a marker line."""
    return root / "logs" / f"{name}.log"


def _recorded(root: Path, name: str) -> tuple[int, str | None] | None:
    try:
        recorded = pid_file(root, name).read_text(encoding="ascii").split()
        return int(recorded[0]), (recorded[1] if len(recorded) > 1 else None)
    except (OSError, ValueError, IndexError):
        return None


def recorded_pid(root: Path, name: str) -> int | None:
    """The pid part `name`'s pid file names, whether it still runs or not."""
    found = _recorded(root, name)
    return found[0] if found else None


def running_part(root: Path, name: str) -> int | None:
    """The pid of part `name` while the process the stack started for it runs, else None.

    The pid file holds the pid and the process's start time, so a pid the kernel has
    since given to an unrelated process is not taken for the part.
    """
    found = _recorded(root, name)
    if found is None:
        return None
    pid, started = found
    if not alive(pid):
        return None
    if started is not None and start_time(pid) not in {None, started}:
        return None
    return pid


def spawn_part(
    root: Path,
    name: str,
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    cwd: Path | None = None,
) -> int:
    """Start part `name` detached in its own session; returns its pid.

    Its output goes to `part_log(root, name)` (after a marker line naming the command),
    its pid and start time to `<root>/pids/<name>.pid`. `env` is added to this
    process's environment; `cwd` is its working directory (default: this process's).
    """
    (root / "logs").mkdir(parents=True, exist_ok=True)
    (root / "pids").mkdir(parents=True, exist_ok=True)
    with part_log(root, name).open("ab") as log:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        log.write(f"{_START_MARK} {name} at {stamp}: {shlex.join(args)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            list(args),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    _children[proc.pid] = proc
    started = start_time(proc.pid) or ""
    pid_file(root, name).write_text(f"{proc.pid} {started}".strip() + "\n", encoding="ascii")
    return proc.pid


def part_log_tail(root: Path, name: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines part `name` wrote to its log since its latest start."""
    path = part_log(root, name)
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - 256_000))
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    mark = text.rfind(_START_MARK)
    if mark >= 0:
        text = text[mark:].partition("\n")[2]
    return "\n".join(text.splitlines()[-lines:])


def stop_part(root: Path, name: str, deadline_s: float = 20, *, tree: bool = False) -> bool:
    """Stop part `name` and its whole session (TERM, then KILL); with `tree`, every process
    below it too. True when it was running.

    Raises:
        StackError: a process of the part survived SIGKILL.
    """
    pid = running_part(root, name)
    pid_file(root, name).unlink(missing_ok=True)
    if pid is None:
        return False
    try:
        terminate(pid, deadline_s, tree=tree)
    except StackError as exc:
        msg = f"{name}: {exc}"
        raise StackError(msg) from exc
    return True

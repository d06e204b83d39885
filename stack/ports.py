"""Who listens where: loopback ports and sockets held by a part (read from /proc), free ports."""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import Mapping
from pathlib import Path

from stack.supervisor import proc_stat, running_part

# Local addresses that take connections to 127.0.0.1, as /proc/net/tcp{,6} writes them.
_LOOPBACK_V4 = {"0100007F", "00000000"}
_LOOPBACK_V6 = {"0" * 32, "0000000000000000FFFF00000100007F"}
_TCP_LISTEN = "0A"
_UNIX_LISTENING = "00010000"


def listening_inodes(port: int | None, socket_path: Path | None) -> set[str] | None:
    """Inodes of the sockets listening on 127.0.0.1:`port` or at `socket_path`.

    None when /proc cannot tell (not Linux).
    """
    found: set[str] = set()
    try:
        if socket_path is not None:
            for row in Path("/proc/net/unix").read_text().splitlines()[1:]:
                cols = row.split()
                if len(cols) >= 8 and cols[3] == _UNIX_LISTENING and cols[7] == str(socket_path):
                    found.add(cols[6])
        if port is not None:
            for table, local in (("tcp", _LOOPBACK_V4), ("tcp6", _LOOPBACK_V6)):
                path = Path("/proc/net") / table
                if not path.exists():
                    continue
                for row in path.read_text().splitlines()[1:]:
                    cols = row.split()
                    address, _, hex_port = cols[1].partition(":")
                    if cols[3] == _TCP_LISTEN and int(hex_port, 16) == port and address in local:
                        found.add(cols[9])
    except OSError:
        return None
    return found


def socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        with contextlib.suppress(OSError):
            target = str(fd.readlink())
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def session(leader: int) -> list[int]:
    """`leader` and every process of its session (a server's worker processes)."""
    members = [leader]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != leader:
            stat = proc_stat(int(entry.name))
            if stat is not None and len(stat) > 3 and stat[3] == str(leader):
                members.append(int(entry.name))
    return members


def part_listens(
    root: Path, name: str, *, port: int | None = None, socket_path: Path | None = None
) -> bool:
    """Part `name` runs and itself holds the socket listening on 127.0.0.1:`port` (or at
    `socket_path`): the part's process, or a process of its session.

    Where /proc cannot tell (not Linux), a running part is taken at its word.
    """
    pid = running_part(root, name)
    if pid is None:
        return False
    listeners = listening_inodes(port, socket_path)
    if listeners is None:
        return True
    if not listeners:
        return False
    return any(listeners & socket_inodes(member) for member in session(pid))


def listener_pids(port: int) -> list[int]:
    """The processes holding a socket that listens on 127.0.0.1:`port` (from /proc)."""
    listeners = listening_inodes(port, None)
    if not listeners:
        return []
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and listeners & socket_inodes(int(entry.name))
    ]


def port_holder(port: int) -> str:
    """` by pid N (command)` for the process listening on `port`, when /proc tells."""
    for pid in listener_pids(port)[:1]:
        with contextlib.suppress(OSError):
            command = Path(f"/proc/{pid}/comm").read_text().strip()
            return f" by pid {pid} ({command})"
        return f" by pid {pid}"
    return ""


# A stack's engine keeps its containers under `<stack dir>/podman/root`; each container's
# monitor (conmon) names that storage on its command line.
_STACK_STORAGE = re.compile(r"^(/.+)/podman/root(?:/|$)")


def owning_stack(pid: int) -> Path | None:
    """The stack directory whose engine runs process `pid` in one of its containers: the
    storage its container monitor (an ancestor) names; None for any other process."""
    for _ in range(8):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        for arg in args:
            found = _STACK_STORAGE.match(arg.decode("utf-8", "replace"))
            if found:
                return Path(found.group(1))
        stat = proc_stat(pid)
        if stat is None or len(stat) < 2 or int(stat[1]) <= 1:
            return None
        pid = int(stat[1])
    return None


def foreign_holders(engine_home: Path, ports: Mapping[int, str]) -> dict[Path, list[str]]:
    """Of `ports` (port -> what needs it), those held by containers of another stack's
    engine than the one in `engine_home`, by that stack's directory."""
    held: dict[Path, list[str]] = {}
    mine = engine_home.resolve()
    for port, what in sorted(ports.items()):
        for pid in listener_pids(port):
            stack = owning_stack(pid)
            if stack is not None and stack.resolve() != mine:
                held.setdefault(stack, []).append(f"127.0.0.1:{port} ({what}, pid {pid})")
                break
    return held


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def choose_port(recorded: int | None, preferred: int | None) -> tuple[int, str]:
    """The recorded port if free, else the preferred one if free, else any free one;
    with a note saying which port was taken, and by whom, when it had to move."""
    note = ""
    for port in (recorded, preferred):
        if port is None:
            continue
        if port_free(port):
            return port, note
        note = note or f"127.0.0.1:{port} is taken{port_holder(port)}"
    return free_port(), note


def recorded_port(address: str | None) -> int | None:
    found = re.search(r":(\d+)(?:/api)?$", address or "")
    return int(found.group(1)) if found else None

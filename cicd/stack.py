"""The local stack: a Docker-API engine, an OCI registry, a base image, optionally Prefect.

Everything lives under `stack_dir()` (ELICE_STACK_DIR, else `state_dir()`): podman's
storage, the registry's blobs, config files, logs, pid files and `stack.json`.
`ensure_stack()` is idempotent and safe to call from concurrent processes (file lock).

A part is up only when the process the stack started for it is alive, answers on its own
address, and holds the listening socket there (it or a process of its session, read from
/proc). Anything else answering on a recorded port is not ours: the part starts on another
free port, and `stack.json` records where. A part that exits, or does not answer in time,
fails `ensure_stack` with the last lines of its log (`<stack dir>/logs/<part>.log`).

Long-running parts are processes with a pid file and a log file; `spawn_part`,
`running_part`, `part_listens` and `stop_part` work for any part by name, and
`stop_stack` stops every part that has a pid file.

`ensure_stack(progress=...)` reports each step as it starts and when it is done, with
seconds (`StackStep`); the library itself prints nothing.

Monitoring (with the worker, or `monitoring=True`): Debian's Prometheus scrapes every service
of every environment where the docker target publishes it, with the project's rules, and
alerts through Debian's Alertmanager to the saved Slack / PagerDuty blocks, else to a log
(`alert_log_file`, written by the `alert-log` part, cicd/alert_log.py). Their configuration
is made in cicd/stack_monitoring.py and lives in `<stack dir>/monitoring/`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

import docker
import httpx
from docker.errors import DockerException, ImageNotFound
from pydantic import BaseModel, ConfigDict, Field

from blocks.stack import StackInfo, load_stack_info, save_stack_info, stack_dir
from cicd.stack_monitoring import (
    saved_receivers,
    stack_pipeline_config,
    write_alertmanager_config,
    write_prometheus_config,
)
from core.errors import ConfigError, StackError, ToolError
from tasks.engine import engine_client
from tasks.process import run_tool, which

BASE_IMAGE = "localhost/python-base:3.11"
PAUSE_IMAGE = "localhost/podman-pause:catatonit"
DEFAULT_REGISTRY_PORT = 5000
DEFAULT_PROMETHEUS_PORT = 9090
DEFAULT_ALERTMANAGER_PORT = 9093
DEFAULT_SLACK_RECEIVER_PORT = 3000
MONITORING_DEPS = ("prometheus", "prometheus-alertmanager")
MONITORING_PARTS = ("prometheus", "alertmanager", "alert-log")
ALERT_LOG_SCRIPT = Path(__file__).resolve().with_name("alert_log.py")
PROMETHEUS_RETENTION = "15d"
SYSTEM_DEPS = ("podman", "buildah", "runc", "docker-registry", "debootstrap", "catatonit")
INSTALL_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install-system-deps.sh"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The parts ensure_stack runs, in the order stop_stack stops them (dependents first).
PARTS = ("slack-receiver", *MONITORING_PARTS, "prefect", "registry", "engine")
LOG_TAIL_LINES = 25
# A running part of ours that holds its address gets this long to answer before a restart.
REUSE_PATIENCE_S = 10.0
_START_MARK = "--- elice stack: starting"

CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
infra_image = "{pause}"
"""

REGISTRY_CONF = """\
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {data}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
  headers:
    X-Content-Type-Options: [nosniff]
"""


class StackPart(BaseModel):
    """One part of the stack as `stack_status()` sees it."""

    model_config = ConfigDict(frozen=True)

    name: str
    state: Literal["running", "stopped", "external", "present", "missing"]
    address: str = ""


# --- progress --------------------------------------------------------------------------


StepState = Literal["start", "done", "failed", "info"]


class StackStep(BaseModel):
    """One line of `ensure_stack`'s progress: a step started, done or failed, or a fact."""

    model_config = ConfigDict(frozen=True)

    part: str = Field(
        description="engine, registry, base-image, pause-image, prefect, system, "
        "alert-log, alertmanager, prometheus"
    )
    state: StepState
    text: str = Field(description="What starts, what it ended as, or the fact")
    seconds: float | None = Field(default=None, description="How long the step took")

    def outcome(self) -> str:
        """How a step ended, e.g. `ready in 1.2s` (the text alone for start and info)."""
        if self.state == "failed":
            return f"failed after {self.seconds or 0.0:.1f}s"
        if self.state == "done":
            return f"{self.text} in {self.seconds or 0.0:.1f}s"
        return self.text

    def line(self) -> str:
        """The step as one plain line, e.g. `engine: starting podman API service ...`."""
        suffix = " ..." if self.state == "start" else ""
        return f"{self.part}: {self.outcome()}{suffix}"


Progress = Callable[[StackStep], None]


class _Steps:
    """Reports steps to an optional `Progress` callback."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress

    def _emit(self, part: str, state: StepState, text: str, seconds: float | None = None) -> None:
        if self.progress is not None:
            self.progress(StackStep(part=part, state=state, text=text, seconds=seconds))

    def info(self, part: str, text: str) -> None:
        self._emit(part, "info", text)

    def start(self, part: str, text: str) -> float:
        self._emit(part, "start", text)
        return time.monotonic()

    def done(self, part: str, started: float, text: str = "ready") -> None:
        self._emit(part, "done", text, round(time.monotonic() - started, 1))

    def failed(self, part: str, started: float) -> None:
        self._emit(part, "failed", "failed", round(time.monotonic() - started, 1))

    @contextlib.contextmanager
    def step(self, part: str, text: str, done: str = "ready") -> Iterator[None]:
        started = self.start(part, text)
        try:
            yield
        except BaseException:
            self.failed(part, started)
            raise
        self.done(part, started, done)


@contextlib.contextmanager
def _locked(root: Path, steps: _Steps | None = None) -> Iterator[None]:
    with (root / "stack.lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if steps is not None:
                steps.info("stack", "another process is starting this stack; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- processes -------------------------------------------------------------------------


def _pid_file(root: Path, name: str) -> Path:
    return root / "pids" / f"{name}.pid"


def part_log(root: Path, name: str) -> Path:
    """The log file of part `name`; every start appends to it after a marker line."""
    return root / "logs" / f"{name}.log"


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (state, ppid, pgrp, session, ...), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    return text.rsplit(") ", 1)[-1].split()


def _start_time(pid: int) -> str | None:
    stat = _proc_stat(pid)
    return stat[19] if stat is not None and len(stat) > 19 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = _proc_stat(pid)
    return stat is None or stat[0] not in {"Z", "X"}


def _reap(pid: int) -> int | None:
    """The exit code of our exited child `pid` (reaping it), else None."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status) if done else None


def running_part(root: Path, name: str) -> int | None:
    """The pid of part `name` while the process the stack started for it runs, else None.

    The pid file holds the pid and the process's start time, so a pid the kernel has
    since given to an unrelated process is not taken for the part.
    """
    try:
        recorded = _pid_file(root, name).read_text(encoding="ascii").split()
        pid = int(recorded[0])
    except (OSError, ValueError, IndexError):
        return None
    if not _alive(pid):
        return None
    if len(recorded) > 1 and _start_time(pid) not in {None, recorded[1]}:
        return None
    return pid


def spawn_part(
    root: Path, name: str, args: Sequence[str], env: Mapping[str, str] | None = None
) -> int:
    """Start part `name` detached in its own session; returns its pid.

    Its output goes to `part_log(root, name)` (after a marker line naming the command),
    its pid and start time to `<root>/pids/<name>.pid`. `env` is added to this
    process's environment.
    """
    (root / "logs").mkdir(parents=True, exist_ok=True)
    (root / "pids").mkdir(parents=True, exist_ok=True)
    with part_log(root, name).open("ab") as log:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        log.write(f"{_START_MARK} {name} at {stamp}: {shlex.join(args)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    started = _start_time(proc.pid) or ""
    _pid_file(root, name).write_text(f"{proc.pid} {started}".strip() + "\n", encoding="ascii")
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


def stop_part(root: Path, name: str, deadline_s: float = 20) -> bool:
    """Stop part `name` and its whole session (TERM, then KILL); True when it was running."""
    pid = running_part(root, name)
    _pid_file(root, name).unlink(missing_ok=True)
    if pid is None:
        return False
    for sig, wait in ((signal.SIGTERM, deadline_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        end = time.monotonic() + wait
        while time.monotonic() < end:
            _reap(pid)
            if not _alive(pid):
                return True
            time.sleep(0.2)
    return True


# --- who listens where -------------------------------------------------------------------

# Local addresses that take connections to 127.0.0.1, as /proc/net/tcp{,6} writes them.
_LOOPBACK_V4 = {"0100007F", "00000000"}
_LOOPBACK_V6 = {"0" * 32, "0000000000000000FFFF00000100007F"}
_TCP_LISTEN = "0A"
_UNIX_LISTENING = "00010000"


def _listening_inodes(port: int | None, socket_path: Path | None) -> set[str] | None:
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


def _socket_inodes(pid: int) -> set[str]:
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


def _session(leader: int) -> list[int]:
    """`leader` and every process of its session (a server's worker processes)."""
    members = [leader]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != leader:
            stat = _proc_stat(int(entry.name))
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
    listeners = _listening_inodes(port, socket_path)
    if listeners is None:
        return True
    if not listeners:
        return False
    return any(listeners & _socket_inodes(member) for member in _session(pid))


def _port_holder(port: int) -> str:
    """` by pid N (command)` for the process listening on `port`, when /proc tells."""
    listeners = _listening_inodes(port, None)
    if not listeners:
        return ""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and listeners & _socket_inodes(int(entry.name)):
            with contextlib.suppress(OSError):
                command = (entry / "comm").read_text().strip()
                return f" by pid {entry.name} ({command})"
            return f" by pid {entry.name}"
    return ""


def _port_free(port: int) -> bool:
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


def _choose_port(recorded: int | None, preferred: int | None) -> tuple[int, str]:
    """The recorded port if free, else the preferred one if free, else any free one;
    with a note saying which port was taken, and by whom, when it had to move."""
    note = ""
    for port in (recorded, preferred):
        if port is None:
            continue
        if _port_free(port):
            return port, note
        note = note or f"127.0.0.1:{port} is taken{_port_holder(port)}"
    return free_port(), note


def _http_ok(url: str, transport: httpx.HTTPTransport | None = None) -> bool:
    try:
        with httpx.Client(transport=transport, timeout=3, trust_env=False) as client:
            return client.get(url).status_code == 200
    except httpx.HTTPError:
        return False


def _reusable(listens: Callable[[], bool], answers: Callable[[], bool], patience_s: float) -> bool:
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


def _wait_up(root: Path, name: str, what: str, up: Callable[[], bool], deadline_s: float) -> None:
    """Wait until `up()`. A part that exits, or does not answer in time (then it is
    stopped), fails with the last lines of its log.

    Raises:
        StackError: naming the part, how it failed, its log and the log's last lines.
    """
    pid = running_part(root, name)
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if up():
            return
        if running_part(root, name) is None:
            code = _reap(pid) if pid is not None else None
            _pid_file(root, name).unlink(missing_ok=True)
            how = "exited" if code is None else f"exited with code {code}"
            msg = f"{what} {how} before it answered"
            raise StackError(_with_log(msg, root, name))
        time.sleep(0.3)
    stop_part(root, name)
    msg = f"{what} did not answer within {deadline_s:.0f}s (stopped it)"
    raise StackError(_with_log(msg, root, name))


def _with_log(message: str, root: Path, name: str) -> str:
    tail = part_log_tail(root, name) or "(nothing)"
    return f"{message}; last lines of {part_log(root, name)}:\n{tail}"


def _start_on_port(
    root: Path,
    name: str,
    what: str,
    port: int,
    note: str,
    command: Callable[[int], tuple[list[str], dict[str, str]]],
    up: Callable[[int], bool],
    deadline_s: float,
    steps: _Steps,
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
            _wait_up(root, name, what, functools.partial(up, port), deadline_s)
        except StackError:
            steps.failed(name, started)
            if retried or _port_free(port):
                raise
            retried = True
            note = f"127.0.0.1:{port} was taken{_port_holder(port)} meanwhile"
            port = free_port()
            continue
        steps.done(name, started)
        return port


def _recorded_port(address: str | None) -> int | None:
    found = re.search(r":(\d+)(?:/api)?$", address or "")
    return int(found.group(1)) if found else None


# --- system packages -------------------------------------------------------------------


def ensure_system_deps(
    tools: tuple[str, ...] = SYSTEM_DEPS, progress: Progress | None = None
) -> None:
    """Install the stack's system packages when missing (root on Debian only).

    Raises:
        StackError: a tool is missing and cannot be installed here.
    """
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return
    if os.geteuid() != 0 or not Path("/etc/debian_version").exists():
        msg = f"missing {', '.join(missing)}: run {INSTALL_SCRIPT} as root (Debian) first"
        raise StackError(msg)
    what = f"installing {', '.join(missing)} with apt-get (minutes, the first time)"
    with _Steps(progress).step("system", what, done="installed"):
        done = run_tool(["bash", str(INSTALL_SCRIPT)], timeout=1800)
        if not done.ok:
            msg = f"{INSTALL_SCRIPT} failed (exit {done.returncode}):\n{done.excerpt(20)}"
            raise StackError(msg)


# --- engine ----------------------------------------------------------------------------


def _engine_paths(root: Path) -> tuple[Path, Path]:
    home = root.absolute()  # the socket's path as bound is what /proc/net/unix shows
    return home / "podman", home / "podman.sock"


def _engine_alive(docker_host: str) -> bool:
    if docker_host.startswith("unix://"):
        sock = docker_host.removeprefix("unix://")
        if not Path(sock).exists():
            return False
        return _http_ok("http://engine/_ping", httpx.HTTPTransport(uds=sock))
    return _http_ok(re.sub(r"^tcp://", "http://", docker_host).rstrip("/") + "/_ping")


def _engine_up(root: Path) -> bool:
    """Our podman service holds its socket and answers /_ping there."""
    sock = _engine_paths(root)[1]
    return part_listens(root, "engine", socket_path=sock) and _engine_alive(f"unix://{sock}")


def registries_conf(registry: str) -> str:
    """registries.conf marking the local registry (and loopback) insecure."""
    entries = dict.fromkeys([registry, "127.0.0.1", "localhost"])
    blocks = "".join(f'\n[[registry]]\nlocation = "{e}"\ninsecure = true\n' for e in entries)
    return f"unqualified-search-registries = []\n{blocks}"


def _write_if_changed(path: Path, text: str) -> bool:
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    path.write_text(text, encoding="utf-8")
    return True


def _ensure_engine(root: Path, registry: str, steps: _Steps) -> str:
    """The engine's DOCKER_HOST; starts Podman's API service when ours does not serve it."""
    if os.environ.get("DOCKER_HOST"):
        host = os.environ["DOCKER_HOST"]
        if not _engine_alive(host):
            msg = f"DOCKER_HOST={host} does not answer /_ping; start that engine or unset it"
            raise StackError(msg)
        steps.info("engine", f"using DOCKER_HOST={host}")
        return host
    storage, sock = _engine_paths(root)
    conf_dir = root / "conf"
    conf_dir.mkdir(exist_ok=True)
    changed = _write_if_changed(
        conf_dir / "containers.conf", CONTAINERS_CONF.format(pause=PAUSE_IMAGE)
    )
    changed |= _write_if_changed(conf_dir / "registries.conf", registries_conf(registry))
    host = f"unix://{sock}"
    listens = functools.partial(part_listens, root, "engine", socket_path=sock)
    if _reusable(listens, lambda: _engine_alive(host), REUSE_PATIENCE_S):
        if not changed:
            steps.info("engine", f"running at {host} (pid {running_part(root, 'engine')})")
            return host
        steps.info("engine", "its configuration changed: restarting (containers keep running)")
    stop_part(root, "engine")  # conmon owns the containers: they survive
    ensure_system_deps(progress=steps.progress)
    sock.unlink(missing_ok=True)
    env = {
        "CONTAINERS_CONF": str(conf_dir / "containers.conf"),
        "CONTAINERS_REGISTRIES_CONF": str(conf_dir / "registries.conf"),
    }
    args = [which("podman"), "--root", str(storage / "root"), "--runroot", str(storage / "run")]
    with steps.step("engine", f"starting podman API service at {host}"):
        spawn_part(root, "engine", [*args, "system", "service", "--time=0", host], env)
        _wait_up(root, "engine", "podman system service", lambda: _engine_up(root), 60)
    return host


# --- registry --------------------------------------------------------------------------


def _registry_alive(port: int) -> bool:
    return _http_ok(f"http://127.0.0.1:{port}/v2/")


def _registry_up(root: Path, port: int) -> bool:
    """Our docker-registry holds 127.0.0.1:`port` and answers /v2/ there."""
    return part_listens(root, "registry", port=port) and _registry_alive(port)


def _ensure_registry(root: Path, previous: StackInfo | None, steps: _Steps) -> str:
    recorded = _recorded_port(previous.registry if previous else None)
    if recorded is not None and _reusable(
        functools.partial(part_listens, root, "registry", port=recorded),
        functools.partial(_registry_alive, recorded),
        REUSE_PATIENCE_S,
    ):
        pid = running_part(root, "registry")
        steps.info("registry", f"running at 127.0.0.1:{recorded} (pid {pid})")
        return f"127.0.0.1:{recorded}"
    stop_part(root, "registry")
    ensure_system_deps(("docker-registry",), progress=steps.progress)
    data = root / "registry" / "data"
    data.mkdir(parents=True, exist_ok=True)
    conf = root / "registry" / "config.yml"

    def command(port: int) -> tuple[list[str], dict[str, str]]:
        conf.write_text(REGISTRY_CONF.format(data=data, port=port), encoding="utf-8")
        return [which("docker-registry"), "serve", str(conf)], {}

    port, note = _choose_port(recorded, DEFAULT_REGISTRY_PORT)
    port = _start_on_port(
        root,
        "registry",
        "docker-registry",
        port,
        note,
        command,
        lambda p: _registry_up(root, p),
        30,
        steps,
    )
    return f"127.0.0.1:{port}"


# --- images ----------------------------------------------------------------------------


def debian_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The Debian mirror apt is configured with (deb822 or one-line format)."""
    files = [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for line in text.splitlines():
            found = re.match(r"^\s*(?:deb\s+(?:\[[^]]*]\s+)?|URIs:\s*)(\S+)", line)
            if found and re.search(r"/debian/?$", found.group(1)):
                return found.group(1)
    return "http://deb.debian.org/debian"


def _image_present(client: docker.DockerClient, name: str) -> bool:
    try:
        client.images.get(name)
    except ImageNotFound:
        return False
    return True


def _import_rootfs(
    client: docker.DockerClient, rootfs: Path, name: str, changes: list[str]
) -> None:
    with tempfile.TemporaryDirectory(dir=rootfs.parent) as tmp:
        tarball = Path(tmp) / "rootfs.tar"
        done = run_tool(["tar", "-C", str(rootfs), "-cf", str(tarball), "."], timeout=600)
        if not done.ok:
            msg = f"cannot pack {rootfs}: {done.excerpt(10)}"
            raise StackError(msg)
        # "repo:tag" in `repository`: podman ignores the separate tag parameter
        client.api.import_image_from_file(str(tarball), repository=name, changes=changes)


def build_base_image(client: docker.DockerClient, root: Path, name: str = BASE_IMAGE) -> float:
    """Build `name` from Debian bookworm with debootstrap; returns the seconds it took.

    Raises:
        StackError: debootstrap failed.
    """
    ensure_system_deps(("debootstrap",))
    started = time.monotonic()
    work = root / "build"
    work.mkdir(exist_ok=True)
    rootfs = Path(tempfile.mkdtemp(prefix="python-base-", dir=work))
    try:
        include = "--include=python3,python3-venv,ca-certificates"
        args = [which("debootstrap"), "--variant=minbase", include, "bookworm", str(rootfs)]
        done = run_tool([*args, debian_mirror()], timeout=1800)
        if not done.ok:
            msg = f"debootstrap failed (exit {done.returncode}):\n{done.excerpt(20)}"
            raise StackError(msg)
        changes = [f"ENV PATH={DEFAULT_PATH}", "ENV LANG=C.UTF-8", 'CMD ["python3"]']
        _import_rootfs(client, rootfs, name, changes)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    return time.monotonic() - started


def build_pause_image(client: docker.DockerClient, root: Path, name: str = PAUSE_IMAGE) -> None:
    """A pause image for `podman kube play`: catatonit alone in a scratch image."""
    catatonit = Path(shutil.which("catatonit") or "/usr/libexec/podman/catatonit")
    rootfs = Path(tempfile.mkdtemp(prefix="pause-", dir=root))
    try:
        shutil.copy2(catatonit, rootfs / "catatonit")
        changes = ['ENTRYPOINT ["/catatonit", "-P"]']
        _import_rootfs(client, rootfs, name, changes)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


def _ensure_images(docker_host: str, root: Path, steps: _Steps) -> str | None:
    """Make sure the base (and, on podman, pause) images exist; returns the pause image."""
    client = engine_client(docker_host)
    pause: str | None = None
    try:
        if _image_present(client, BASE_IMAGE):
            steps.info("base-image", f"{BASE_IMAGE} present")
        else:
            what = f"building {BASE_IMAGE} with debootstrap (about a minute)"
            with steps.step("base-image", what, done="built"):
                build_base_image(client, root)
        if not os.environ.get("DOCKER_HOST") and shutil.which("catatonit"):
            if not _image_present(client, PAUSE_IMAGE):
                with steps.step("pause-image", f"building {PAUSE_IMAGE}", done="built"):
                    build_pause_image(client, root)
            pause = PAUSE_IMAGE
    except DockerException as exc:
        msg = f"engine at {docker_host} failed while preparing images: {exc}"
        raise StackError(msg) from exc
    finally:
        client.close()
    return pause


# --- prefect ---------------------------------------------------------------------------


def _prefect_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/api"


LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"


def _prefect_up(root: Path, port: int) -> bool:
    """Our Prefect server holds 127.0.0.1:`port` and answers /api/health there."""
    url = _prefect_url(port)
    return part_listens(root, "prefect", port=port) and _http_ok(f"{url}/health")


def _ensure_prefect(root: Path, previous: StackInfo | None, steps: _Steps) -> str:
    recorded = _recorded_port(previous.prefect_api_url if previous else None)
    if recorded is not None and _reusable(
        functools.partial(part_listens, root, "prefect", port=recorded),
        functools.partial(_http_ok, f"{_prefect_url(recorded)}/health"),
        REUSE_PATIENCE_S,
    ):
        pid = running_part(root, "prefect")
        steps.info("prefect", f"running at {_prefect_url(recorded)} (pid {pid})")
        return _prefect_url(recorded)
    stop_part(root, "prefect")

    def command(port: int) -> tuple[list[str], dict[str, str]]:
        env = {
            "PREFECT_HOME": str(root / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_URL": _prefect_url(port),
            # deploy locks' leases survive a server restart (in memory, a slot held
            # across the restart would stay taken for good)
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": LEASE_STORAGE,
        }
        args = [which("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        return args, env

    port, note = _choose_port(recorded, None)
    port = _start_on_port(
        root,
        "prefect",
        "Prefect server",
        port,
        note or "its first start migrates the database",
        command,
        lambda p: _prefect_up(root, p),
        180,
        steps,
    )
    return _prefect_url(port)


# --- monitoring ------------------------------------------------------------------------


def alert_log_file(root: Path | None = None) -> Path:
    """Where the stack's default alert receiver writes each alert, one JSON line (0600)."""
    return (root or stack_dir()) / "logs" / "alerts.log"


def _alert_log_port_file(root: Path) -> Path:
    return root / "monitoring" / "alert-log.port"


def _recorded_alert_log_port(root: Path) -> int | None:
    try:
        return int(_alert_log_port_file(root).read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None


# What each monitoring part answers 200 on once it serves.
_READY_PATHS = {
    "prometheus": "/-/ready",
    "alertmanager": "/-/ready",
    "alert-log": "/-/healthy",
    "slack-receiver": "/health",
}


def _monitor_alive(name: str, port: int) -> bool:
    return _http_ok(f"http://127.0.0.1:{port}{_READY_PATHS[name]}")


def _monitor_up(root: Path, name: str, port: int) -> bool:
    """Our part `name` holds 127.0.0.1:`port` and says it is ready there."""
    return part_listens(root, name, port=port) and _monitor_alive(name, port)


def _ensure_served(
    root: Path,
    name: str,
    what: str,
    recorded: int | None,
    preferred: int | None,
    changed: bool,
    command: Callable[[int], tuple[list[str], dict[str, str]]],
    deadline_s: float,
    steps: _Steps,
) -> int:
    """Part `name` on its recorded port when it runs there, answers, and its configuration
    did not change; else (re)started, on another port when that one is taken."""
    if recorded is not None and _reusable(
        functools.partial(part_listens, root, name, port=recorded),
        functools.partial(_monitor_alive, name, recorded),
        REUSE_PATIENCE_S,
    ):
        if not changed:
            pid = running_part(root, name)
            steps.info(name, f"running at 127.0.0.1:{recorded} (pid {pid})")
            return recorded
        steps.info(name, "its configuration changed: restarting")
    stop_part(root, name)
    port, note = _choose_port(recorded, preferred)
    return _start_on_port(
        root,
        name,
        what,
        port,
        note,
        command,
        functools.partial(_monitor_up, root, name),
        deadline_s,
        steps,
    )


def _private_log(root: Path, name: str) -> None:
    """Part `name`'s log readable by its owner only (it may name a receiver)."""
    path = part_log(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    path.chmod(0o600)


def _ensure_monitoring(
    home: Path, previous: StackInfo | None, api_url: str | None, steps: _Steps
) -> tuple[str, str]:
    """The alert log receiver, Alertmanager and Prometheus, in that order (each one's
    configuration names the one before); returns Prometheus' and Alertmanager's URLs."""
    ensure_system_deps(MONITORING_DEPS, progress=steps.progress)
    try:
        config = stack_pipeline_config(api_url)
    except ConfigError as exc:
        msg = f"monitoring needs the pipeline's configuration: {exc}"
        raise StackError(msg) from exc
    receivers = saved_receivers(api_url)
    if receivers.note:
        steps.info("alertmanager", receivers.note)
    folder = home / "monitoring"
    folder.mkdir(parents=True, exist_ok=True)
    alerts = alert_log_file(home)

    def alert_log(port: int) -> tuple[list[str], dict[str, str]]:
        args = [sys.executable, str(ALERT_LOG_SCRIPT), "--port", str(port), "--file", str(alerts)]
        return args, {}

    log_port = _ensure_served(
        home,
        "alert-log",
        "alert log receiver",
        _recorded_alert_log_port(home),
        None,
        False,
        alert_log,
        15,
        steps,
    )
    _alert_log_port_file(home).write_text(f"{log_port}\n", encoding="ascii")

    am_yml, am_changed = write_alertmanager_config(
        folder, receivers, f"http://127.0.0.1:{log_port}/alerts"
    )

    def alertmanager(port: int) -> tuple[list[str], dict[str, str]]:
        args = [
            which("prometheus-alertmanager"),
            f"--config.file={am_yml}",
            f"--storage.path={home / 'alertmanager' / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--web.external-url=http://127.0.0.1:{port}",
            "--cluster.listen-address=",  # one instance: no gossip port
        ]
        return args, {}

    _private_log(home, "alertmanager")
    am_port = _ensure_served(
        home,
        "alertmanager",
        "Alertmanager",
        _recorded_port(previous.alertmanager_url if previous else None),
        DEFAULT_ALERTMANAGER_PORT,
        am_changed,
        alertmanager,
        30,
        steps,
    )
    steps.info("alertmanager", receivers.routes(alerts))

    prom_yml, prom_changed = write_prometheus_config(folder, config, f"127.0.0.1:{am_port}")

    def prometheus(port: int) -> tuple[list[str], dict[str, str]]:
        args = [
            which("prometheus"),
            f"--config.file={prom_yml}",
            f"--storage.tsdb.path={home / 'prometheus' / 'data'}",
            f"--storage.tsdb.retention.time={PROMETHEUS_RETENTION}",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--web.external-url=http://127.0.0.1:{port}",
        ]
        return args, {}

    prom_port = _ensure_served(
        home,
        "prometheus",
        "Prometheus",
        _recorded_port(previous.prometheus_url if previous else None),
        DEFAULT_PROMETHEUS_PORT,
        prom_changed,
        prometheus,
        60,
        steps,
    )
    envs = [env.name for env in config.environments.environments]
    services = len(config.catalog.services)
    steps.info("prometheus", f"scraping {services} services in {', '.join(envs)}")
    return f"http://127.0.0.1:{prom_port}", f"http://127.0.0.1:{am_port}"


def _monitoring_status(home: Path, info: StackInfo) -> list[StackPart]:
    parts = []
    for name, url in (("prometheus", info.prometheus_url), ("alertmanager", info.alertmanager_url)):
        port = _recorded_port(url)
        alive = port is not None and _monitor_up(home, name, port)
        parts.append(
            StackPart(name=name, state="running" if alive else "stopped", address=url or "")
        )
    port = _recorded_alert_log_port(home)
    alive = port is not None and _monitor_up(home, "alert-log", port)
    parts.append(
        StackPart(
            name="alert-log",
            state="running" if alive else "stopped",
            address=str(alert_log_file(home)),
        )
    )
    return parts


# --- approvals ---------------------------------------------------------------------------


def _ensure_slack_receiver(
    home: Path, previous: StackInfo | None, api_url: str, steps: _Steps
) -> str:
    """The receiver of Slack's Approve / Reject buttons (`cicd/slack_receiver.py`), on
    loopback, reading the signing secret and the Slack users where the gate does: the
    server's Secret block and the protected branch's approval policy."""

    def command(port: int) -> tuple[list[str], dict[str, str]]:
        args = [sys.executable, "-m", "cicd.slack_receiver", "--port", str(port)]
        return [*args, "--from-prefect"], {"PREFECT_API_URL": api_url}

    port = _ensure_served(
        home,
        "slack-receiver",
        "Slack receiver",
        _recorded_port(previous.slack_receiver_url if previous else None),
        DEFAULT_SLACK_RECEIVER_PORT,
        False,
        command,
        30,
        steps,
    )
    url = f"http://127.0.0.1:{port}"
    steps.info("slack-receiver", f"Slack's request URL: {url}/slack/actions behind HTTPS")
    return url


# --- public API ------------------------------------------------------------------------


def ensure_stack(
    *,
    prefect: bool = False,
    worker: bool = False,
    monitoring: bool | None = None,
    root: Path | None = None,
    progress: Progress | None = None,
) -> StackInfo:
    """Reuse what runs and start what does not: registry, engine, base image, Prefect,
    the worker and the Slack receiver, Prometheus and Alertmanager.

    Args:
        prefect: also run a Prefect server on a loopback port.
        worker: also make that server ready for the pipeline (`cicd setup`: work pool,
            limits, blocks, the deployments of prefect.yaml) and run a supervised process
            worker on it, so the UI, the schedules and `prefect deployment run` work; and
            the Slack receiver for the approval buttons beside it (kept once running).
        monitoring: also run Prometheus (every docker-target service of every environment
            of the configuration, the project's rules) and Alertmanager (to the saved Slack /
            PagerDuty blocks, else to `alert_log_file`); None: with the worker. Once running,
            they are kept (their configuration refreshed) like Prefect.
        root: the stack's home (default `stack_dir()`).
        progress: called with each step as it starts and ends (`StackStep`); the CLI
            prints them, flows and tests pass nothing.

    Raises:
        StackError: a part could not be installed or did not come up; for a part that
            exited or stayed silent, with the last lines of its log.
    """
    home = root or stack_dir()
    home.mkdir(parents=True, exist_ok=True)
    steps = _Steps(progress)
    with _locked(home, steps):
        previous = load_stack_info(home)
        registry = _ensure_registry(home, previous, steps)
        docker_host = _ensure_engine(home, registry, steps)
        pause = _ensure_images(docker_host, home, steps)
        api_url: str | None = None
        if prefect or worker or running_part(home, "prefect") is not None:
            api_url = _ensure_prefect(home, previous, steps)
        slack_receiver_url: str | None = None
        if worker and api_url is not None:
            _ensure_deployments_and_worker(home, api_url, steps)
        if api_url is not None and (worker or running_part(home, "slack-receiver") is not None):
            slack_receiver_url = _ensure_slack_receiver(home, previous, api_url, steps)
        prometheus_url: str | None = None
        alertmanager_url: str | None = None
        wanted = monitoring if monitoring is not None else worker
        if wanted or any(running_part(home, name) is not None for name in MONITORING_PARTS):
            prometheus_url, alertmanager_url = _ensure_monitoring(home, previous, api_url, steps)
        info = StackInfo(
            docker_host=docker_host,
            registry=registry,
            base_image=BASE_IMAGE,
            prefect_api_url=api_url,
            pause_image=pause,
            prometheus_url=prometheus_url,
            alertmanager_url=alertmanager_url,
            slack_receiver_url=slack_receiver_url,
        )
        save_stack_info(info, home)
        return info


def _ensure_deployments_and_worker(home: Path, api_url: str, steps: _Steps) -> None:
    from cicd.setup import ensure_setup  # noqa: PLC0415 - loads the flows: only when asked
    from cicd.worker import ensure_worker, worker_pid  # noqa: PLC0415

    with steps.step("deployments", "work pool, limits, blocks, deployments of prefect.yaml"):
        changes = ensure_setup(api_url)
    changed = sum(c.action != "unchanged" for c in changes)
    steps.info("deployments", f"{changed} created or updated, {len(changes) - changed} unchanged")
    running = worker_pid(home)
    with steps.step("worker", "process worker on pool elice-process"):
        pid = ensure_worker(home, api_url)
    if running == pid:
        steps.info("worker", f"running (pid {pid})")


def stop_stack(root: Path | None = None) -> list[str]:
    """Stop every part the stack started (never an external engine), dependents first.

    Parts other than `PARTS` (started with `spawn_part`, e.g. a worker) stop first.
    Returns the names of the parts that were running.
    """
    from cicd.worker import stop_worker  # noqa: PLC0415

    home = root or stack_dir()
    with _locked(home):
        stopped = ["worker"] if stop_worker(home) else []  # with the runs it started
        others = sorted(p.stem for p in (home / "pids").glob("*.pid") if p.stem not in PARTS)
        return stopped + [name for name in (*others, *PARTS) if stop_part(home, name)]


def stack_status(root: Path | None = None) -> list[StackPart]:
    """Each part of the stack: running, stopped, external, present or missing.

    A part is running only when the process the stack started holds its address and
    answers there: something else answering on a recorded port does not count.
    """
    home = root or stack_dir()
    info = load_stack_info(home)
    parts: list[StackPart] = []
    if os.environ.get("DOCKER_HOST"):
        host = os.environ["DOCKER_HOST"]
        state: Literal["running", "stopped", "external"] = "external"
        parts.append(
            StackPart(
                name="engine", state=state if _engine_alive(host) else "stopped", address=host
            )
        )
    else:
        host = f"unix://{_engine_paths(home)[1]}"
        parts.append(
            StackPart(
                name="engine", state="running" if _engine_up(home) else "stopped", address=host
            )
        )
    registry = info.registry if info else ""
    port = _recorded_port(registry)
    alive = port is not None and _registry_up(home, port)
    parts.append(
        StackPart(name="registry", state="running" if alive else "stopped", address=registry)
    )
    parts.append(_image_part(parts[0], BASE_IMAGE))
    url = info.prefect_api_url if info else None
    port = _recorded_port(url)
    alive = port is not None and _prefect_up(home, port)
    parts.append(
        StackPart(name="prefect", state="running" if alive else "stopped", address=url or "")
    )
    if info is not None and (info.prometheus_url or info.alertmanager_url):
        parts.extend(_monitoring_status(home, info))
    if info is not None and info.slack_receiver_url:
        port = _recorded_port(info.slack_receiver_url)
        alive = port is not None and _monitor_up(home, "slack-receiver", port)
        parts.append(
            StackPart(
                name="slack-receiver",
                state="running" if alive else "stopped",
                address=info.slack_receiver_url,
            )
        )
    return parts


def _image_part(engine: StackPart, name: str) -> StackPart:
    if engine.state == "stopped":
        return StackPart(name="base-image", state="missing", address=name)
    try:
        client = engine_client(engine.address, timeout=30)
    except ToolError:
        return StackPart(name="base-image", state="missing", address=name)
    try:
        present = _image_present(client, name)
    finally:
        client.close()
    return StackPart(name="base-image", state="present" if present else "missing", address=name)

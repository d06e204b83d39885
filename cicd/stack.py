"""The local stack: a Docker-API engine, an OCI registry, a base image, optionally Prefect.

Everything lives under `stack_dir()` (ELICE_STACK_DIR, else `state_dir()`): podman's
storage, the registry's blobs, config files, logs, pid files and `stack.json`.
`ensure_stack()` is idempotent and safe to call from concurrent processes (file lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Literal

import docker
import httpx
from docker.errors import DockerException, ImageNotFound
from pydantic import BaseModel, ConfigDict, Field

from blocks.config import state_dir
from tasks.exceptions import ToolError
from tasks.process import run_logger, run_tool, which

BASE_IMAGE = "localhost/python-base:3.11"
PAUSE_IMAGE = "localhost/podman-pause:catatonit"
DEFAULT_REGISTRY_PORT = 5000
SYSTEM_DEPS = ("podman", "buildah", "runc", "docker-registry", "debootstrap", "catatonit")
INSTALL_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install-system-deps.sh"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

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


class StackError(ToolError):
    """A part of the local stack could not be installed or started."""


class StackInfo(BaseModel):
    """Where the parts of the local stack answer."""

    model_config = ConfigDict(frozen=True)

    docker_host: str = Field(description="Docker API endpoint, e.g. unix:///.../podman.sock")
    registry: str = Field(description="OCI registry address, 127.0.0.1:PORT")
    base_image: str = Field(description="Base image for service builds")
    prefect_api_url: str | None = Field(default=None, description="Local Prefect server API")
    pause_image: str | None = Field(default=None, description="Infra image for kube play")


class StackPart(BaseModel):
    """One part of the stack as `stack_status()` sees it."""

    model_config = ConfigDict(frozen=True)

    name: str
    state: Literal["running", "stopped", "external", "present", "missing"]
    address: str = ""


def stack_dir() -> Path:
    """The stack's home: ELICE_STACK_DIR, else the state dir."""
    custom = os.environ.get("ELICE_STACK_DIR")
    path = Path(custom) if custom else state_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _info_file(root: Path) -> Path:
    return root / "stack.json"


def load_stack_info(root: Path | None = None) -> StackInfo | None:
    """The last recorded StackInfo, or None when the stack was never started."""
    path = _info_file(root or stack_dir())
    if not path.exists():
        return None
    return StackInfo.model_validate_json(path.read_text(encoding="utf-8"))


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    with (root / "stack.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- processes -------------------------------------------------------------------------


def _pid_file(root: Path, name: str) -> Path:
    return root / "pids" / f"{name}.pid"


def _running_pid(root: Path, name: str) -> int | None:
    path = _pid_file(root, name)
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"):
        return None
    return pid


def _spawn(root: Path, name: str, args: list[str], env: Mapping[str, str] | None = None) -> int:
    """Start a detached process with its log under root/logs and a pid file."""
    (root / "logs").mkdir(exist_ok=True)
    (root / "pids").mkdir(exist_ok=True)
    with (root / "logs" / f"{name}.log").open("ab") as log:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    _pid_file(root, name).write_text(str(proc.pid))
    return proc.pid


def _wait_until(
    check: Callable[[], bool], what: str, root: Path, name: str, deadline_s: float
) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if check():
            return
        if _running_pid(root, name) is None:
            break
        time.sleep(0.3)
    log = root / "logs" / f"{name}.log"
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log.exists() else ""
    msg = f"{what} did not come up within {deadline_s:.0f}s; log {log}:\n{tail}"
    raise StackError(msg)


def _stop(root: Path, name: str, deadline_s: float = 20) -> bool:
    """Stop a stack process (its whole session); True when one was running."""
    pid = _running_pid(root, name)
    _pid_file(root, name).unlink(missing_ok=True)
    if pid is None:
        return False
    for sig, wait in ((signal.SIGTERM, deadline_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        end = time.monotonic() + wait
        while time.monotonic() < end:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.2)
    return True


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


def _http_ok(url: str, transport: httpx.HTTPTransport | None = None) -> bool:
    try:
        with httpx.Client(transport=transport, timeout=3, trust_env=False) as client:
            return client.get(url).status_code == 200
    except httpx.HTTPError:
        return False


# --- system packages -------------------------------------------------------------------


def ensure_system_deps(tools: tuple[str, ...] = SYSTEM_DEPS) -> None:
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
    run_logger().info("installing system packages for %s", ", ".join(missing))
    done = run_tool(["bash", str(INSTALL_SCRIPT)], timeout=1800)
    if not done.ok:
        msg = f"{INSTALL_SCRIPT} failed (exit {done.returncode}):\n{done.excerpt(20)}"
        raise StackError(msg)


# --- engine ----------------------------------------------------------------------------


def _engine_paths(root: Path) -> tuple[Path, Path]:
    return root / "podman", root / "podman.sock"


def _engine_alive(docker_host: str) -> bool:
    if docker_host.startswith("unix://"):
        sock = docker_host.removeprefix("unix://")
        if not Path(sock).exists():
            return False
        return _http_ok("http://engine/_ping", httpx.HTTPTransport(uds=sock))
    return _http_ok(re.sub(r"^tcp://", "http://", docker_host).rstrip("/") + "/_ping")


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


def _ensure_engine(root: Path, registry: str) -> str:
    """The engine's DOCKER_HOST; starts Podman's API service when nothing serves it."""
    if os.environ.get("DOCKER_HOST"):
        host = os.environ["DOCKER_HOST"]
        if not _engine_alive(host):
            msg = f"DOCKER_HOST={host} does not answer /_ping; start that engine or unset it"
            raise StackError(msg)
        return host
    storage, sock = _engine_paths(root)
    conf_dir = root / "conf"
    conf_dir.mkdir(exist_ok=True)
    changed = _write_if_changed(
        conf_dir / "containers.conf", CONTAINERS_CONF.format(pause=PAUSE_IMAGE)
    )
    changed |= _write_if_changed(conf_dir / "registries.conf", registries_conf(registry))
    host = f"unix://{sock}"
    if _running_pid(root, "engine") is not None and _engine_alive(host):
        if not changed:
            return host
        _stop(root, "engine")  # containers survive: conmon owns them
    ensure_system_deps()
    sock.unlink(missing_ok=True)
    env = {
        "CONTAINERS_CONF": str(conf_dir / "containers.conf"),
        "CONTAINERS_REGISTRIES_CONF": str(conf_dir / "registries.conf"),
    }
    args = [which("podman"), "--root", str(storage / "root"), "--runroot", str(storage / "run")]
    _spawn(root, "engine", [*args, "system", "service", "--time=0", host], env)
    _wait_until(lambda: _engine_alive(host), "podman system service", root, "engine", 60)
    return host


# --- registry --------------------------------------------------------------------------


def _registry_port(previous: StackInfo | None) -> int:
    if previous is not None:
        port = int(previous.registry.rsplit(":", 1)[1])
        if _registry_alive(port) or _port_free(port):
            return port
    return DEFAULT_REGISTRY_PORT if _port_free(DEFAULT_REGISTRY_PORT) else free_port()


def _registry_alive(port: int) -> bool:
    return _http_ok(f"http://127.0.0.1:{port}/v2/")


def _ensure_registry(root: Path, port: int) -> str:
    address = f"127.0.0.1:{port}"
    if _running_pid(root, "registry") is not None and _registry_alive(port):
        return address
    _stop(root, "registry")
    ensure_system_deps(("docker-registry",))
    data = root / "registry" / "data"
    data.mkdir(parents=True, exist_ok=True)
    conf = root / "registry" / "config.yml"
    conf.write_text(REGISTRY_CONF.format(data=data, port=port), encoding="utf-8")
    _spawn(root, "registry", [which("docker-registry"), "serve", str(conf)])
    _wait_until(
        lambda: _registry_alive(port), f"docker-registry on {address}", root, "registry", 30
    )
    return address


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
        run_logger().info("building %s with debootstrap (about a minute)", name)
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


def _ensure_images(docker_host: str, root: Path) -> str | None:
    """Make sure the base (and, on podman, pause) images exist; returns the pause image."""
    client = docker.DockerClient(base_url=docker_host, timeout=600)
    pause: str | None = None
    try:
        if not _image_present(client, BASE_IMAGE):
            seconds = build_base_image(client, root)
            run_logger().info("built %s in %.0fs", BASE_IMAGE, seconds)
        if not os.environ.get("DOCKER_HOST") and shutil.which("catatonit"):
            if not _image_present(client, PAUSE_IMAGE):
                build_pause_image(client, root)
            pause = PAUSE_IMAGE
    except DockerException as exc:
        msg = f"engine at {docker_host} failed while preparing images: {exc}"
        raise StackError(msg) from exc
    finally:
        client.close()
    return pause


# --- prefect ---------------------------------------------------------------------------


def _prefect_port(previous: StackInfo | None) -> int:
    if previous is not None and previous.prefect_api_url:
        found = re.search(r":(\d+)/api$", previous.prefect_api_url)
        if found:
            return int(found.group(1))
    return free_port()


def _ensure_prefect(root: Path, port: int) -> str:
    url = f"http://127.0.0.1:{port}/api"
    if _running_pid(root, "prefect") is not None and _http_ok(f"{url}/health"):
        return url
    _stop(root, "prefect")
    if not _port_free(port):
        port = free_port()
        url = f"http://127.0.0.1:{port}/api"
    env = {
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": url,
    }
    args = [which("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    _spawn(root, "prefect", args, env)
    _wait_until(lambda: _http_ok(f"{url}/health"), "prefect server", root, "prefect", 180)
    return url


# --- public API ------------------------------------------------------------------------


def ensure_stack(*, prefect: bool = False, root: Path | None = None) -> StackInfo:
    """Reuse what runs and start what does not: engine, registry, base image, Prefect.

    Args:
        prefect: also run a Prefect server on a loopback port.
        root: the stack's home (default `stack_dir()`).

    Raises:
        StackError: a part could not be installed or did not come up.
    """
    home = root or stack_dir()
    home.mkdir(parents=True, exist_ok=True)
    with _locked(home):
        previous = load_stack_info(home)
        registry = f"127.0.0.1:{_registry_port(previous)}"
        docker_host = _ensure_engine(home, registry)
        registry = _ensure_registry(home, int(registry.rsplit(":", 1)[1]))
        pause = _ensure_images(docker_host, home)
        api_url: str | None = None
        if prefect or _running_pid(home, "prefect") is not None:
            api_url = _ensure_prefect(home, _prefect_port(previous))
        info = StackInfo(
            docker_host=docker_host,
            registry=registry,
            base_image=BASE_IMAGE,
            prefect_api_url=api_url,
            pause_image=pause,
        )
        _info_file(home).write_text(info.model_dump_json(indent=2), encoding="utf-8")
        return info


def stop_stack(root: Path | None = None) -> list[str]:
    """Stop the processes the stack started (not an external engine); returns their names."""
    home = root or stack_dir()
    with _locked(home):
        return [name for name in ("prefect", "registry", "engine") if _stop(home, name)]


def stack_status(root: Path | None = None) -> list[StackPart]:
    """Each part of the stack: running, stopped, external, present or missing."""
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
        alive = _running_pid(home, "engine") is not None and _engine_alive(host)
        parts.append(
            StackPart(name="engine", state="running" if alive else "stopped", address=host)
        )
    registry = info.registry if info else ""
    alive = bool(registry) and _running_pid(home, "registry") is not None
    alive = alive and _registry_alive(int(registry.rsplit(":", 1)[1]))
    parts.append(
        StackPart(name="registry", state="running" if alive else "stopped", address=registry)
    )
    parts.append(_image_part(parts[0], BASE_IMAGE))
    url = info.prefect_api_url if info else None
    alive = bool(url) and _running_pid(home, "prefect") is not None and _http_ok(f"{url}/health")
    parts.append(
        StackPart(name="prefect", state="running" if alive else "stopped", address=url or "")
    )
    return parts


def _image_part(engine: StackPart, name: str) -> StackPart:
    if engine.state == "stopped":
        return StackPart(name="base-image", state="missing", address=name)
    client = docker.DockerClient(base_url=engine.address, timeout=30)
    try:
        present = _image_present(client, name)
    finally:
        client.close()
    return StackPart(name="base-image", state="present" if present else "missing", address=name)

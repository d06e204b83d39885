"""A supervised local process worker, and the worker image.

`ensure_worker()` starts `prefect worker start --pool elice-process --type process` as a
detached process of its own session (pid file `root/pids/worker.pid`, log
`root/logs/worker.log`) with PREFECT_API_URL and ELICE_REPO set, unless one already runs
for the same server and pool, and waits until the server lists it online. Deployment runs
then execute in child processes of that worker: prefect.yaml's pull step changes into
`{{ $ELICE_REPO }}`, which the run resolves from the worker's environment.

`build_worker_image()` builds worker/Dockerfile through a Docker API engine from a context
holding only the pipeline (cicd, flows, tasks, blocks, config, deployments, the lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import signal
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from docker.errors import APIError, DockerException
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import WorkerStatus
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings

from cicd.setup import HEARTBEAT_S
from core.errors import ConfigError, ImageError, StackError, ToolError
from tasks.engine import engine_client
from tasks.process import which

CHECKOUT = Path(__file__).resolve().parents[1]
WORKER = "worker"
DEFAULT_POOL = "elice-process"
QUERY_SECONDS = 2.0
"""How often the local worker asks for runs (Prefect's default is 10 s): a run started
from the UI begins within about this long."""

WORKER_DOCKERFILE = "worker/Dockerfile"
WORKER_IMAGE = "localhost/elice-devops-worker:latest"
EXTRA_CA_PATH = ".build/extra-ca.crt"
IMAGE_FILES = ("pyproject.toml", "uv.lock", "README.md", "prefect.yaml", WORKER_DOCKERFILE)
IMAGE_TREES = ("blocks", "cicd", "core", "flows", "tasks", "config", "deployments")
_SKIPPED = {"__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".venv"}


# --- processes -------------------------------------------------------------------------


def _pid_file(root: Path) -> Path:
    return root / "pids" / f"{WORKER}.pid"


def log_file(root: Path) -> Path:
    """The worker's log (its stdout and stderr)."""
    return root / "logs" / f"{WORKER}.log"


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with (root / "worker.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (reaping it when it is our child)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return not stat.rsplit(") ", 1)[-1].startswith("Z")


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {key: value for key, _, value in pairs}


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children, grandchildren, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[-1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def _start_time(pid: int) -> str | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[-1].split()
    except OSError:
        return None
    return fields[19] if len(fields) > 19 else None


def worker_pid(root: Path) -> int | None:
    """The pid of the worker `ensure_worker(root, ...)` started, while it runs.

    The pid file holds the pid and the process's start time (the format of cicd/stack.py's
    parts): a pid the kernel has since given to another process does not count.
    """
    try:
        recorded = _pid_file(root).read_text(encoding="ascii").split()
        pid = int(recorded[0])
    except (OSError, ValueError, IndexError):
        return None
    if not _alive(pid):
        return None
    if len(recorded) > 1 and _start_time(pid) not in {None, recorded[1]}:
        return None
    args = _cmdline(pid)
    if "worker" not in args or "start" not in args:  # the pid now names another process
        return None
    return pid


def worker_name(root: Path, pool: str = DEFAULT_POOL) -> str:
    """The name the worker of `root` registers with the server: pool, host, home."""
    home = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
    return f"{pool}-{socket.gethostname()}-{home}"


def _option(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args[:-1] else None


def _serves(pid: int, api_url: str, pool: str, checkout: Path) -> bool:
    env = _environ(pid)
    return (
        _option(_cmdline(pid), "--pool") == pool
        and env.get("PREFECT_API_URL") == api_url
        and env.get("ELICE_REPO") == str(checkout)
    )


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:  # a group leader: the worker, or a run's own session
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _terminate(pid: int, deadline_s: float) -> None:
    """Stop `pid` and every process below it (flow runs start their own sessions)."""
    known = {pid, *descendants(pid)}
    for sig, wait in ((signal.SIGTERM, deadline_s), (signal.SIGKILL, 5.0)):
        known |= set(descendants(pid)) if _alive(pid) else set()
        for proc in sorted(known):
            _signal(proc, sig)
        end = time.monotonic() + wait
        while time.monotonic() < end:
            known = {p for p in known if _alive(p)}
            if not known:
                return
            time.sleep(0.2)
    if known:
        msg = f"processes {sorted(known)} of the worker survived SIGKILL"
        raise StackError(msg)


def _log_tail(root: Path, lines: int = 20) -> str:
    path = log_file(root)
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _online(api_url: str, pool: str, name: str, since: datetime | None) -> bool:
    with (
        temporary_settings(updates={PREFECT_API_URL: api_url}),
        get_client(sync_client=True) as client,
    ):
        try:
            workers = client.read_workers_for_work_pool(pool)
        except ObjectNotFound:
            return False
    for worker in workers:
        if worker.name != name or worker.status != WorkerStatus.ONLINE:
            continue
        beat = worker.last_heartbeat_time
        # A worker of the same name stopped a moment ago still shows as online: after a
        # start, only a heartbeat from the new process counts.
        if since is None or (beat is not None and beat >= since - timedelta(seconds=5)):
            return True
    return False


def ensure_worker(
    root: Path,
    api_url: str,
    pool: str = DEFAULT_POOL,
    *,
    repo: Path | None = None,
    query_seconds: float = QUERY_SECONDS,
    timeout_s: float = 90.0,
    limit: int | None = None,
) -> int:
    """Run a process worker for `pool` of the server at `api_url`, started once; its pid.

    Args:
        root: home of the pid file (`pids/worker.pid`) and the log (`logs/worker.log`).
        repo: the checkout the runs execute (ELICE_REPO): prefect.yaml's entrypoints are
            found there. Default: this checkout.
        query_seconds: how often the worker asks the server for runs.
        limit: at most this many runs at once on this worker (None: no limit).
        timeout_s: how long the worker may take to come online.

    Raises:
        ConfigError: `repo` holds no prefect.yaml.
        StackError: the worker exited or did not come online; with its log's last lines.
    """
    checkout = (repo or CHECKOUT).resolve()
    if not (checkout / "prefect.yaml").is_file():
        msg = f"{checkout}: no prefect.yaml; ELICE_REPO must be a checkout of elice-devops"
        raise ConfigError(msg)
    name = worker_name(root, pool)
    with _locked(root):
        pid = worker_pid(root)
        if pid is not None and not _serves(pid, api_url, pool, checkout):
            _pid_file(root).unlink(missing_ok=True)
            _terminate(pid, 20.0)
            pid = None
        since: datetime | None = None
        if pid is None:
            since = datetime.now(UTC)
            pid = _spawn(root, pool, name, api_url, checkout, query_seconds, limit)
        end = time.monotonic() + timeout_s
        while not _online(api_url, pool, name, since):
            if not _alive(pid):
                msg = f"the worker for {pool} exited; {log_file(root)}:\n{_log_tail(root)}"
                raise StackError(msg)
            if time.monotonic() > end:
                msg = (
                    f"the worker for {pool} is not online at {api_url} after {timeout_s:.0f}s;"
                    f" {log_file(root)}:\n{_log_tail(root)}"
                )
                raise StackError(msg)
            time.sleep(0.5)
        return pid


def _spawn(
    root: Path,
    pool: str,
    name: str,
    api_url: str,
    checkout: Path,
    query_seconds: float,
    limit: int | None = None,
) -> int:
    (root / "logs").mkdir(parents=True, exist_ok=True)
    (root / "pids").mkdir(parents=True, exist_ok=True)
    args = [which("prefect"), "worker", "start", "--pool", pool, "--type", "process"]
    if limit is not None:
        args += ["--limit", str(limit)]
    env = {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "ELICE_REPO": str(checkout),
        "PREFECT_WORKER_QUERY_SECONDS": str(query_seconds),
        # each flow run's process beats every HEARTBEAT_S; `cicd setup`'s automation marks
        # a run Crashed after three silent beats (worker or machine gone)
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
    }
    with log_file(root).open("ab") as log:
        proc = subprocess.Popen(
            [*args, "--name", name],
            cwd=root,  # not the checkout: the deployment's pull step must get the run there
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    started = _start_time(proc.pid) or ""
    _pid_file(root).write_text(f"{proc.pid} {started}".strip() + "\n", encoding="ascii")
    return proc.pid


def stop_worker(root: Path, deadline_s: float = 20.0) -> bool:
    """Stop the worker of `root` and every process below it; True when one was running.

    Raises:
        StackError: a process survived SIGKILL.
    """
    with _locked(root):
        pid = worker_pid(root)
        _pid_file(root).unlink(missing_ok=True)
        if pid is None:
            return False
        _terminate(pid, deadline_s)
        return True


# --- the worker image ------------------------------------------------------------------


def worker_build_context(root: Path = CHECKOUT, extra_ca: str | None = None) -> io.BytesIO:
    """The worker image's build context as a tar: the pipeline, its lock, the Dockerfile.

    Raises:
        ValueError: a file the image needs is missing from `root`.
    """
    missing = [f for f in (*IMAGE_FILES, *IMAGE_TREES) if not (root / f).exists()]
    if missing:
        msg = f"{root}: missing {', '.join(missing)}; is this a checkout of elice-devops?"
        raise ValueError(msg)
    files = [root / f for f in IMAGE_FILES]
    for tree in IMAGE_TREES:
        files += [
            p
            for p in sorted((root / tree).rglob("*"))
            if p.is_file()
            and not _SKIPPED.intersection(p.relative_to(root).parts)
            and p.suffix not in {".pyc", ".pyo"}
        ]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in files:
            tar.add(path, arcname=str(path.relative_to(root)), recursive=False)
        data = (extra_ca or "").encode()
        info = tarfile.TarInfo(EXTRA_CA_PATH)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    return buffer


def _image_id(chunks: Iterator[dict[str, Any]]) -> str:
    lines: list[str] = []
    image_id = ""
    for chunk in chunks:
        if "stream" in chunk:
            lines.extend(ln for ln in str(chunk["stream"]).splitlines() if ln.strip())
        if isinstance(chunk.get("aux"), dict):
            image_id = str(chunk["aux"].get("ID", image_id))
        if "error" in chunk or "errorDetail" in chunk:
            error = chunk.get("error") or chunk["errorDetail"].get("message", "")
            tail = "\n".join(lines[-30:])
            msg = f"worker image build failed: {error}\n{tail}"
            raise ImageError(msg)
    if not image_id:
        found = [ln for ln in lines if ln.startswith("Successfully built ") or len(ln) == 64]
        image_id = found[-1].split()[-1] if found else ""
    if not image_id:
        msg = "worker image build: the engine reported no image id:\n" + "\n".join(lines[-30:])
        raise ImageError(msg)
    return image_id


def build_worker_image(
    docker_host: str,
    tag: str = WORKER_IMAGE,
    *,
    base_image: str | None = None,
    extra_ca: str | None = None,
    root: Path = CHECKOUT,
) -> str:
    """Build worker/Dockerfile through the engine at `docker_host`; the image id.

    Args:
        base_image: BASE_IMAGE build argument (None: the Dockerfile's default).
        extra_ca: PEM bundle trusted by the builder stage only (`local_ca_bundle()`).

    Raises:
        ImageError: the build failed; with the output's tail.
        ToolError: the engine is unreachable.
    """
    context = worker_build_context(root, extra_ca)
    client = engine_client(docker_host)
    try:
        stream = client.api.build(
            fileobj=context,
            custom_context=True,
            dockerfile=WORKER_DOCKERFILE,
            tag=tag,
            buildargs={"BASE_IMAGE": base_image} if base_image else {},
            network_mode="host",
            rm=True,
            forcerm=True,
            decode=True,
        )
        return _image_id(stream)
    except APIError as exc:
        msg = f"engine refused the worker image build: {exc.explanation or exc}"
        raise ImageError(msg) from exc
    except DockerException as exc:
        msg = f"engine connection failed during the worker image build: {exc}"
        raise ToolError(msg) from exc
    finally:
        client.close()

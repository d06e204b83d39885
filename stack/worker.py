"""The supervised local worker: the project's trusted process worker.

`ensure_worker()` starts `python -m stack.trusted_worker start --pool elice-process` as a
part of the stack (stack/supervisor.py: pid file `root/pids/worker.pid`, log
`root/logs/worker.log`, refusals also in `root/logs/worker-audit.jsonl`) with
PREFECT_API_URL and ELICE_REPO set (and the server's auth string as PREFECT_API_AUTH_STRING,
in its environment only), unless one already runs for the same server, credentials, pool
and checkout, and waits until the server lists it online. Its trust file
(`root/trust/worker.yaml`, owner-only) pins the checkout as the repository, `main` as the
protected branch and the environments the stack deploys into: the worker starts only runs
of deployments that prefect.yaml on that branch declares (stack/trusted_worker.py).
Deployment runs then execute in child processes of that worker: prefect.yaml's pull step
changes into `{{ $ELICE_REPO }}`, which the run resolves from the worker's environment.
"""

from __future__ import annotations

import hashlib
import socket
import sys
import time
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import WorkerStatus
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
from prefect.settings.legacy import Setting

from core.errors import ConfigError, StackError
from core.trust import TrustRoots, load_trust_roots, write_trust_roots
from reconcile.setup import HEARTBEAT_S
from stack.supervisor import (
    alive,
    cmdline,
    environ,
    locked,
    part_log,
    part_log_tail,
    pid_file,
    running_part,
    spawn_part,
    terminate,
)

CHECKOUT = Path(__file__).resolve().parents[1]
WORKER = "worker"
DEFAULT_POOL = "elice-process"
PROTECTED_BRANCH = "main"
ENVIRONMENTS = ("dev", "staging", "production")
"""The environments the stack's one worker deploys into (it holds all their credentials)."""
QUERY_SECONDS = 2.0
"""How often the local worker asks for runs (Prefect's default is 10 s): a run started
from the UI begins within about this long."""


def log_file(root: Path) -> Path:
    """The worker's log (its stdout and stderr)."""
    return part_log(root, WORKER)


def trust_file(root: Path) -> Path:
    """The trust file the stack writes for its worker (owner-only)."""
    return root / "trust" / "worker.yaml"


def audit_log(root: Path) -> Path:
    """The worker's refusals, one JSON object per line."""
    return root / "logs" / "worker-audit.jsonl"


def _locked(root: Path) -> AbstractContextManager[None]:
    return locked(root / "worker.lock")


def worker_pid(root: Path) -> int | None:
    """The pid of the worker `ensure_worker(root, ...)` started, while it runs.

    A part of the stack's supervisor, checked once more by its command line: a pid the
    kernel has since given to another process does not count.
    """
    pid = running_part(root, WORKER)
    if pid is None:
        return None
    args = cmdline(pid)
    if "stack.trusted_worker" not in args or "start" not in args:  # now another process
        return None
    return pid


def worker_name(root: Path, pool: str = DEFAULT_POOL) -> str:
    """The name the worker of `root` registers with the server: pool, host, home."""
    home = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
    return f"{pool}-{socket.gethostname()}-{home}"


def _option(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args[:-1] else None


def _serves(pid: int, api_url: str, pool: str, checkout: Path, auth: str | None) -> bool:
    env = environ(pid)
    args = cmdline(pid)
    return (
        _option(args, "--pool") == pool
        and _option(args, "--trust-file") is not None
        and env.get("PREFECT_API_URL") == api_url
        and env.get("ELICE_REPO") == str(checkout)
        and (auth is None or env.get("PREFECT_API_AUTH_STRING") == auth)
    )


def _online(
    api_url: str, pool: str, name: str, since: datetime | None, auth: str | None = None
) -> bool:
    updates: dict[Setting, object] = {PREFECT_API_URL: api_url}
    if auth is not None:
        updates[PREFECT_API_AUTH_STRING] = auth
    with (
        temporary_settings(updates=updates),
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
    repository: str | None = None,
    repository_name: str = "",
    query_seconds: float = QUERY_SECONDS,
    timeout_s: float = 90.0,
    limit: int | None = None,
    auth: str | None = None,
) -> int:
    """Run a process worker for `pool` of the server at `api_url`, started once; its pid.

    Args:
        root: home of the pid file (`pids/worker.pid`) and the log (`logs/worker.log`).
        repo: the checkout the runs execute (ELICE_REPO): prefect.yaml's entrypoints are
            found there. Default: this checkout.
        repository: the repository the worker's trust file pins (whose protected branch
            decides what runs and ships). Default: the checkout.
        repository_name: its owner/name as GitHub spells it (a run naming another is refused).
        query_seconds: how often the worker asks the server for runs.
        limit: at most this many runs at once on this worker (None: no limit).
        timeout_s: how long the worker may take to come online.
        auth: the server's auth string (PREFECT_API_AUTH_STRING), passed in the worker's
            environment (its runs inherit it); None: the worker's environment decides.

    Raises:
        ConfigError: `repo` holds no prefect.yaml.
        StackError: the worker exited or did not come online; with its log's last lines.
    """
    checkout = (repo or CHECKOUT).resolve()
    if not (checkout / "prefect.yaml").is_file():
        msg = f"{checkout}: no prefect.yaml; ELICE_REPO must be a checkout of elice-devops"
        raise ConfigError(msg)
    name = worker_name(root, pool)
    roots = _trust_roots(checkout, repository, repository_name)
    with _locked(root):
        pid = worker_pid(root)
        if pid is not None and (
            not _serves(pid, api_url, pool, checkout, auth) or _pinned(root) != roots
        ):
            pid_file(root, WORKER).unlink(missing_ok=True)
            terminate(pid, 20.0, tree=True)
            pid = None
        since: datetime | None = None
        if pid is None:
            since = datetime.now(UTC)
            write_trust_roots(trust_file(root), roots)
            pid = _spawn(root, pool, name, api_url, checkout, query_seconds, limit, auth)
        end = time.monotonic() + timeout_s
        while not _online(api_url, pool, name, since, auth):
            if not alive(pid):
                tail = part_log_tail(root, WORKER)
                msg = f"the worker for {pool} exited; {log_file(root)}:\n{tail}"
                raise StackError(msg)
            if time.monotonic() > end:
                msg = (
                    f"the worker for {pool} is not online at {api_url} after {timeout_s:.0f}s;"
                    f" {log_file(root)}:\n{part_log_tail(root, WORKER)}"
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
    auth: str | None = None,
) -> int:
    trust = trust_file(root)
    args = [
        sys.executable,
        "-m",
        "stack.trusted_worker",
        "start",
        "--pool",
        pool,
        "--trust-file",
        str(trust),
        "--audit-log",
        str(audit_log(root)),
    ]
    if limit is not None:
        args += ["--limit", str(limit)]
    env = {
        # a worker's runs read their configuration from the protected branch, never a file
        # or a block the caller's environment names (core/trust.py)
        "ELICE_CONFIG": "",
        "ELICE_STORAGE": "",
        "PREFECT_API_URL": api_url,
        "ELICE_REPO": str(checkout),
        "PREFECT_WORKER_QUERY_SECONDS": str(query_seconds),
        # each flow run's process beats every HEARTBEAT_S; `cicd setup`'s automation marks
        # a run Crashed after three silent beats (worker or machine gone)
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
    }
    if auth is not None:
        env["PREFECT_API_AUTH_STRING"] = auth  # the environment, never argv (ps shows argv)
    # cwd: not the checkout: the deployment's pull step must get the run there
    return spawn_part(root, WORKER, [*args, "--name", name], env, cwd=root)


def _trust_roots(checkout: Path, repository: str | None, name: str) -> TrustRoots:
    """What the stack's worker trusts: the repository (default: the checkout), its `main`,
    the configuration as committed there, every environment."""
    return TrustRoots(
        repository=repository or str(checkout),
        name=name,
        protected_branch=PROTECTED_BRANCH,
        environments=ENVIRONMENTS,
    )


def _pinned(root: Path) -> TrustRoots | None:
    """The trust roots the worker of `root` was started with; None: none readable."""
    try:
        return load_trust_roots(trust_file(root))
    except ConfigError:
        return None


def pinned_repository(root: Path) -> tuple[str, str] | None:
    """The repository the worker of `root` pins and its GitHub name (kept across `cicd
    stack up`); None: none yet."""
    roots = _pinned(root)
    return (roots.repository, roots.name) if roots is not None else None


def stop_worker(root: Path, deadline_s: float = 20.0) -> bool:
    """Stop the worker of `root` and every process below it (flow runs start sessions of
    their own); True when one was running.

    Raises:
        StackError: a process survived SIGKILL.
    """
    with _locked(root):
        pid = worker_pid(root)
        pid_file(root, WORKER).unlink(missing_ok=True)
        if pid is None:
            return False
        terminate(pid, deadline_s, tree=True)
        return True

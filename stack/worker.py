"""The supervised local workers: the project's trusted process worker, one per role.

The stack runs two (`WORKERS`), each a part of the stack's supervisor (stack/supervisor.py)
with its own pid file `root/pids/<part>.pid`, log `root/logs/<part>.log`, refusals in
`root/logs/<part>-audit.jsonl`, trust file `root/trust/<part>.yaml` (owner-only) and name:

- `worker` polls `elice-process` (CI, staging's promotion, dev and staging rollbacks) and
  may deploy into dev and staging;
- `worker-production` polls `elice-production` (production's promotion, rollback and
  health check) and may deploy into production only.

Each trust file pins the checkout as the repository and `main` as the protected branch:
a worker starts only runs of deployments that prefect.yaml on that branch declares, into an
environment its trust file names (stack/trusted_worker.py). `ensure_worker()` starts one
with PREFECT_API_URL and ELICE_REPO set (and the server's auth string as
PREFECT_API_AUTH_STRING, in its environment only), unless one already runs for the same
server, credentials, pool, checkout and trust roots, and waits until the server lists it
online. Deployment runs then execute in child processes of that worker: prefect.yaml's
pull step changes into `{{ $ELICE_REPO }}`, which the run resolves from the worker's
environment.

Both run on this one host, under one user: the separation is the workers' refusal, not
credentials kept apart (README, "Workers: who deploys where").
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
from reconcile.pools import PROCESS_POOL
from reconcile.setup import HEARTBEAT_S
from stack.supervisor import (
    alive,
    cmdline,
    environ,
    locked,
    part_log,
    part_log_tail,
    pid_file,
    spawn_part,
    terminate,
)
from stack.worker_roles import (
    DEPLOY_WORKER,
    PRODUCTION_WORKER,
    WORKERS,
    WorkerRole,
    worker_parts,
    worker_pid,
)

# The roles and whether each runs live in stack/worker_roles.py (no Prefect, for `cicd stack
# status`); re-exported for this module's users.
__all__ = [
    "DEPLOY_WORKER",
    "PRODUCTION_WORKER",
    "WORKERS",
    "WorkerRole",
    "worker_parts",
    "worker_pid",
]

CHECKOUT = Path(__file__).resolve().parents[1]
PROTECTED_BRANCH = "main"
QUERY_SECONDS = 2.0
"""How often the local worker asks for runs (Prefect's default is 10 s): a run started
from the UI begins within about this long."""


def log_file(root: Path, role: WorkerRole = DEPLOY_WORKER) -> Path:
    """The worker's log (its stdout and stderr)."""
    return part_log(root, role.part)


def trust_file(root: Path, role: WorkerRole = DEPLOY_WORKER) -> Path:
    """The trust file the stack writes for the worker of `role` (owner-only)."""
    return root / "trust" / f"{role.part}.yaml"


def audit_log(root: Path, role: WorkerRole = DEPLOY_WORKER) -> Path:
    """The worker's refusals, one JSON object per line."""
    return root / "logs" / f"{role.part}-audit.jsonl"


def _locked(root: Path, role: WorkerRole) -> AbstractContextManager[None]:
    return locked(root / f"{role.part}.lock")


def _trust_roots(
    role: WorkerRole, checkout: Path, repository: str | None = None, name: str = ""
) -> TrustRoots:
    """What a stack worker trusts: the repository (default: the checkout), its `main`, the
    configuration as committed there, the environments of its role."""
    return TrustRoots(
        repository=repository or str(checkout),
        name=name,
        protected_branch=PROTECTED_BRANCH,
        environments=role.environments,
    )


def worker_name(root: Path, pool: str = PROCESS_POOL) -> str:
    """The name the worker of `root` registers with the server: pool, host, home."""
    home = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
    return f"{pool}-{socket.gethostname()}-{home}"


def _option(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args[:-1] else None


def _pins(path: str | None, roots: TrustRoots) -> bool:
    """Whether the trust file `path` holds `roots` (a worker loads it when it starts, and
    only `_spawn` writes it, just before)."""
    try:
        return path is not None and load_trust_roots(Path(path)) == roots
    except ConfigError:
        return False


def _serves(
    pid: int,
    api_url: str,
    role: WorkerRole,
    checkout: Path,
    auth: str | None,
    root: Path,
    roots: TrustRoots,
) -> bool:
    env = environ(pid)
    args = cmdline(pid)
    trust = _option(args, "--trust-file")
    return (
        _option(args, "--pool") == role.pool
        and trust == str(trust_file(root, role))
        and _pins(trust, roots)
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
    role: WorkerRole = DEPLOY_WORKER,
    *,
    repo: Path | None = None,
    repository: str | None = None,
    repository_name: str = "",
    query_seconds: float = QUERY_SECONDS,
    timeout_s: float = 90.0,
    limit: int | None = None,
    auth: str | None = None,
) -> int:
    """Run the trusted worker of `role` for the server at `api_url`, started once; its pid.

    Args:
        root: home of the pid file (`pids/<part>.pid`), the log (`logs/<part>.log`) and
            the trust file (`trust/<part>.yaml`).
        role: its pool and the environments its trust file names.
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
    pool = role.pool
    name = worker_name(root, pool)
    roots = _trust_roots(role, checkout, repository, repository_name)
    with _locked(root, role):
        pid = worker_pid(root, role)
        if pid is not None and not _serves(pid, api_url, role, checkout, auth, root, roots):
            pid_file(root, role.part).unlink(missing_ok=True)
            terminate(pid, 20.0, tree=True)
            pid = None
        since: datetime | None = None
        if pid is None:
            since = datetime.now(UTC)
            pid = _spawn(root, role, name, api_url, checkout, roots, query_seconds, limit, auth)
        end = time.monotonic() + timeout_s
        while not _online(api_url, pool, name, since, auth):
            if not alive(pid):
                tail = part_log_tail(root, role.part)
                msg = f"the worker for {pool} exited; {log_file(root, role)}:\n{tail}"
                raise StackError(msg)
            if time.monotonic() > end:
                msg = (
                    f"the worker for {pool} is not online at {api_url} after {timeout_s:.0f}s;"
                    f" {log_file(root, role)}:\n{part_log_tail(root, role.part)}"
                )
                raise StackError(msg)
            time.sleep(0.5)
        return pid


def _spawn(
    root: Path,
    role: WorkerRole,
    name: str,
    api_url: str,
    checkout: Path,
    roots: TrustRoots,
    query_seconds: float,
    limit: int | None = None,
    auth: str | None = None,
) -> int:
    trust = write_trust_roots(trust_file(root, role), roots)
    args = [
        sys.executable,
        "-m",
        "stack.trusted_worker",
        "start",
        "--pool",
        role.pool,
        "--trust-file",
        str(trust),
        "--audit-log",
        str(audit_log(root, role)),
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
    return spawn_part(root, role.part, [*args, "--name", name], env, cwd=root)


def _pinned(root: Path, role: WorkerRole = DEPLOY_WORKER) -> TrustRoots | None:
    """The trust roots the worker of `role` in `root` was started with; None: none readable."""
    try:
        return load_trust_roots(trust_file(root, role))
    except ConfigError:
        return None


def pinned_repository(root: Path) -> tuple[str, str] | None:
    """The repository the stack's workers of `root` pin and its GitHub name (kept across
    `cicd stack up`); None: none yet."""
    roots = _pinned(root)
    return (roots.repository, roots.name) if roots is not None else None


def stop_worker(root: Path, deadline_s: float = 20.0, role: WorkerRole = DEPLOY_WORKER) -> bool:
    """Stop the worker of `role` in `root` and every process below it (flow runs start
    sessions of their own); True when one was running.

    Raises:
        StackError: a process survived SIGKILL.
    """
    with _locked(root, role):
        pid = worker_pid(root, role)
        pid_file(root, role.part).unlink(missing_ok=True)
        if pid is None:
            return False
        terminate(pid, deadline_s, tree=True)
        return True


def stop_workers(root: Path, deadline_s: float = 20.0) -> list[str]:
    """Stop every worker of the stack in `root` (`WORKERS`); the parts that were running.

    Raises:
        StackError: a process survived SIGKILL.
    """
    return [role.part for role in WORKERS if stop_worker(root, deadline_s, role)]

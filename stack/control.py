"""The local stack: a Docker-API engine, an OCI registry, a base image, optionally Prefect.

Everything lives under `stack_dir()` (ELICE_STACK_DIR, else `state_dir()`): podman's
storage, the registry's blobs, config files, logs, pid files and `stack.json`.
`ensure_stack()` is idempotent and safe to call from concurrent processes (file lock).

A part is up only when the process the stack started for it is alive, answers on its own
address, and holds the listening socket there (it or a process of its session, read from
/proc). Anything else answering on a recorded port is not ours: the part starts on another
free port, and `stack.json` records where. A part that exits, or does not answer in time,
fails `ensure_stack` with the last lines of its log (`<stack dir>/logs/<part>.log`).

Long-running parts are processes with a pid file and a log file (stack/supervisor.py);
`stop_stack` stops every part that has a pid file.

`ensure_stack(progress=...)` reports each step as it starts and when it is done, with
seconds (`StackStep`); the library itself prints nothing.

Monitoring (with the worker, or `monitoring=True`): Debian's Prometheus scrapes every service
of every environment where the docker target publishes it, with the project's rules, and
alerts through Debian's Alertmanager to the saved Slack / PagerDuty blocks, else to a log
(`alert_log_file`, written by the `alert-log` part, daemons/alert_log.py). Their configuration
is made in stack/monitoring_config.py and lives in `<stack dir>/monitoring/`.

The parts live in their own modules: supervisor (processes), ports (who listens where),
serve (starting a served part and waiting for it), system (apt packages), engine, registry,
images, prefect_server, monitoring, receiver (the Slack receiver) and worker (the two
trusted workers). What each part's state is lives apart, without Prefect: probe (is a part
up), worker_roles (the workers' pools and pids) and status (`stack_status`, re-exported
here), so `cicd stack status` imports none of the rest.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from prefect.settings import PREFECT_API_AUTH_STRING, temporary_settings

from blocks.stack import StackInfo, load_stack_info, save_stack_info, stack_dir
from core.errors import StackError
from stack.engine import ensure_engine, release_storage
from stack.images import ensure_images
from stack.monitoring import MONITORING_PARTS, ensure_monitoring
from stack.ports import foreign_holders
from stack.prefect_server import ensure_prefect, ensure_stack_auth
from stack.receiver import ensure_slack_receiver
from stack.registry import ensure_registry
from stack.status import BASE_IMAGE, stack_status
from stack.steps import Progress, Steps
from stack.supervisor import locked, running_part, stop_part

__all__ = [
    "PARTS",
    "check_service_ports",
    "ensure_stack",
    "stack_status",  # stack/status.py: no Prefect, for `cicd stack status`
    "stop_stack",
]

PARTS = ("slack-receiver", *MONITORING_PARTS, "prefect", "registry", "engine")


def ensure_stack(
    *,
    prefect: bool = False,
    worker: bool = False,
    monitoring: bool | None = None,
    root: Path | None = None,
    progress: Progress | None = None,
    repository: str | None = None,
    service_ports: Mapping[int, str] | None = None,
) -> StackInfo:
    """Reuse what runs and start what does not: registry, engine, base image, Prefect,
    the workers and the Slack receiver, Prometheus and Alertmanager.

    Args:
        prefect: also run a Prefect server on a loopback port.
        worker: also make that server ready for the pipeline (`cicd setup`: work pools,
            limits, blocks, the deployments of prefect.yaml) and run the supervised trusted
            workers on it (dev and staging's, production's: stack/worker.py), so the UI,
            the schedules and `prefect deployment run` work; and the Slack receiver for
            the approval buttons beside it (kept once running).
        monitoring: also run Prometheus (every docker-target service of every environment
            of the configuration, the project's rules) and Alertmanager (to the saved Slack /
            PagerDuty blocks, else to `alert_log_file`); None: with the worker. Once running,
            they are kept (their configuration refreshed) like Prefect.
        root: the stack's home (default `stack_dir()`).
        progress: called with each step as it starts and ends (`StackStep`); the CLI
            prints them, flows and tests pass nothing.
        repository: the repository the worker pins (its protected branch decides what
            runs and ships); None: the one pinned before, else this checkout.
        service_ports: the loopback ports this stack's services will listen on (port ->
            what needs it: `<environment> <service>`); refused before anything starts when
            containers of another stack's engine hold any (`check_service_ports`).

    Raises:
        StackError: a part could not be installed or did not come up; for a part that
            exited or stayed silent, with the last lines of its log; or another stack
            holds this one's service ports.
    """
    home = root or stack_dir()
    if service_ports:
        check_service_ports(home, service_ports)
    home.mkdir(parents=True, exist_ok=True)
    steps = Steps(progress)
    wait_note = functools.partial(
        steps.info, "stack", "another process is starting this stack; waiting for it"
    )
    with locked(home / "stack.lock", wait_note):
        previous = load_stack_info(home)
        registry = ensure_registry(home, previous, steps)
        docker_host = ensure_engine(home, registry, steps)
        pause = ensure_images(docker_host, home, steps)
        api_url: str | None = None
        auth: str | None = None
        if prefect or worker or running_part(home, "prefect") is not None:
            auth = ensure_stack_auth(home)
            api_url = ensure_prefect(home, previous, steps, auth)
        slack_receiver_url: str | None = None
        prometheus_url: str | None = None
        alertmanager_url: str | None = None
        # this process's own calls to the stack's server (setup, the worker's check, the
        # saved receivers) carry its auth string
        with temporary_settings(updates={PREFECT_API_AUTH_STRING: auth} if auth else {}):
            if worker and api_url is not None:
                _ensure_deployments_and_worker(home, api_url, steps, auth, repository)
            if api_url is not None and (worker or running_part(home, "slack-receiver") is not None):
                slack_receiver_url = ensure_slack_receiver(home, previous, api_url, steps, auth)
            wanted = monitoring if monitoring is not None else worker
            if wanted or any(running_part(home, name) is not None for name in MONITORING_PARTS):
                prometheus_url, alertmanager_url = ensure_monitoring(home, previous, api_url, steps)
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


def check_service_ports(home: Path, service_ports: Mapping[int, str]) -> None:
    """Refuse a stack whose services' loopback ports another stack's containers hold.

    Two checkouts on one machine each run their services on the ports of their
    configuration; the second one's deploys could not bind them, and its health checks
    would reach the first one's services. A port held by a container of this stack's own
    engine is its own (a redeploy replaces it); any other process is left to the deploy,
    which names it. A stack on an engine the caller chose (DOCKER_HOST: a real Docker
    engine, or the test suite's stacks on its shared one) is not checked: its containers
    are that engine's, and the test suite's environments have ports of their own, so it
    runs beside a user's stack.

    Raises:
        StackError: naming each stack that holds ports, and which.
    """
    if os.environ.get("DOCKER_HOST"):
        return
    held = foreign_holders(home, service_ports)
    if not held:
        return
    lines = []
    for stack, ports in held.items():
        more = f" and {len(ports) - 3} more" if len(ports) > 3 else ""
        lines.append(f"the stack at {stack} holds {', '.join(ports[:3])}{more}")
    msg = (
        f"this stack's services need ports another stack's containers hold: {'; '.join(lines)}. "
        "Remove that stack's service containers (its services on these ports), or give "
        "this checkout's environments other local_port_offset values (ELICE_CONFIG)"
    )
    raise StackError(msg)


def _ensure_deployments_and_worker(
    home: Path, api_url: str, steps: Steps, auth: str | None, repository: str | None
) -> None:
    from reconcile.setup import ensure_setup  # noqa: PLC0415 - loads the flows: only when asked
    from stack.worker import WORKERS, ensure_worker, pinned_repository, worker_pid  # noqa: PLC0415

    with steps.step("deployments", "work pools, limits, blocks, deployments of prefect.yaml"):
        changes = ensure_setup(api_url)
    changed = sum(c.action != "unchanged" for c in changes)
    steps.info("deployments", f"{changed} created or updated, {len(changes) - changed} unchanged")
    kept = pinned_repository(home)
    url, name = (repository, "") if repository or kept is None else kept
    for role in WORKERS:  # CI, dev and staging's; production's
        running = worker_pid(home, role)
        what = f"process worker on pool {role.pool} (deploys into {', '.join(role.environments)})"
        with steps.step(role.part, what):
            pid = ensure_worker(
                home, api_url, role, auth=auth, repository=url, repository_name=name
            )
        if running == pid:
            steps.info(role.part, f"running (pid {pid})")


def stop_stack(root: Path | None = None, *, say: Callable[[str], None] | None = None) -> list[str]:
    """Stop every part the stack started (never an external engine), dependents first.

    The workers stop first (with their runs), then parts other than `PARTS` (started
    with `spawn_part`). Then the mount Podman's storage driver keeps of the stack's storage
    is released (`release_storage`), so the stack's directory can be removed; `say` gets
    the reason when it cannot be (a container still runs there).
    Returns the names of the parts that were running.
    """
    from stack.worker import stop_workers  # noqa: PLC0415

    home = root or stack_dir()
    with locked(home / "stack.lock"):
        stopped = stop_workers(home)  # with the runs they started
        others = sorted(p.stem for p in (home / "pids").glob("*.pid") if p.stem not in PARTS)
        stopped += [name for name in (*others, *PARTS) if stop_part(home, name)]
        note = release_storage(home)
    if note and say is not None:
        say(note)
    return stopped

"""The project's worker: Prefect's process worker that runs only what the protected branch declares.

Open-source Prefect lets whoever reaches its API rewrite a deployment or start a run with
parameters and job variables of their choosing; the worker is where that stops. Before it
starts a flow run, `TrustedProcessWorker` reads the run's deployment from the API and
compares it with the deployment of the same name in `prefect.yaml` on the protected
branch of the repository its trust file pins (tasks/deployment_check.py): entrypoint,
pull steps, job variables, default parameters, work pool and queue, the run's own job
variables (none allowed) and the run's parameter names (the flow's, minus those that
serve local development only); and the run's effective `environment` against the
environments its trust file names (a dev/staging worker never deploys into production, a
production worker into nothing else). On any difference, or when the branch cannot be
read, the run is not started: it is marked Failed with a one-line reason, and an audit line goes to
the worker's log, the run's log and the audit file (one JSON object per line).

Every run it starts gets `ELICE_TRUST_FILE` (core.trust.TRUST_FILE_ENV) set to the
worker's trust file after the job variables are applied, so no job variable replaces it.

Started as `python -m stack.trusted_worker start --pool P --trust-file F [--name N]
[--audit-log A] [--limit L]` (stack/worker.py does; so does the worker image). Its worker
type is its own (`TYPE`); it polls a `process` pool, whose job template it shares, so
Prefect logs a type-mismatch warning once at start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

import anyio
import anyio.to_thread
from prefect.blocks.core import Block
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import Abort, ObjectNotFound
from prefect.settings import PREFECT_WORKER_HEARTBEAT_SECONDS
from prefect.states import Failed
from prefect.utilities.engine import propose_state
from prefect.workers.process import (
    ProcessJobConfiguration,
    ProcessWorker,
    ProcessWorkerResult,
)

from blocks.docker_target import DockerTarget
from blocks.kubernetes_target import KubernetesTarget
from core.catalog import DOCKER_TARGET_BLOCK
from core.errors import ConfigError, PipelineError
from core.trust import TRUST_FILE_ENV, TrustRoots, load_trust_roots
from tasks.deploy.target import (
    KUBERNETES_TARGET_BLOCK,
    block_digest,
)
from tasks.deployment_check import (
    DeploymentFacts,
    Launch,
    declared_deployment,
    differences,
    environment_difference,
    launch_of,
)

if TYPE_CHECKING:
    from prefect.client.schemas.responses import DeploymentResponse

TYPE = "elice-trusted-process"
AUDIT = logging.getLogger("elice.worker.audit")


def refusal_reason(
    roots: TrustRoots, flow_run: FlowRun, deployment: DeploymentResponse | None, pool: str
) -> str | Launch:
    """Why `flow_run` may not start on a worker of `pool` trusting `roots`; else how to
    start it (`Launch`: the declared working directory and entrypoint, never re-read).

    Reads the protected branch (a fresh fetch): blocking.
    """
    if deployment is None:
        return "not a run of a deployment"
    try:
        declared = declared_deployment(roots, deployment.name)
    except PipelineError as exc:
        return str(exc).splitlines()[0]
    actual = DeploymentFacts(
        name=deployment.name,
        entrypoint=deployment.entrypoint or "",
        pull_steps=list(deployment.pull_steps or []),
        job_variables=dict(deployment.job_variables or {}),
        parameters=dict(deployment.parameters or {}),
        work_pool=deployment.work_pool_name or "",
        work_queue=deployment.work_queue_name or "default",
    )
    parameters = flow_run.parameters or {}
    found = differences(declared, actual, parameters, flow_run.job_variables or {}, pool)
    foreign = environment_difference(declared, parameters, roots)
    if foreign is not None:
        found.append(foreign)
    launch = launch_of(declared, os.environ)
    if launch is None and not found:
        found.append("its pull steps are not one working directory the worker can set itself")
    if not found and launch is not None:
        return launch
    return f"deployment {deployment.name!r} refused: " + "; ".join(found)


class TrustedProcessWorker(ProcessWorker):
    """A process worker that starts only runs of deployments the protected branch declares."""

    type = TYPE
    _description = "Runs only what prefect.yaml on the pinned protected branch declares."
    _display_name = "Elice trusted process"

    def __init__(
        self,
        *args: Any,
        trust_file: Path,
        audit_log: Path | None = None,
        **kwargs: Any,
    ) -> None:
        self.trust_file = trust_file.resolve()
        self.trust_roots = load_trust_roots(self.trust_file)  # refuse to start without them
        if self.trust_roots.config is None:
            msg = f"trust file {self.trust_file}: a worker's must name its configuration (config)"
            raise ConfigError(msg)
        self.audit_log = audit_log
        self._launches: dict[UUID, Launch] = {}
        super().__init__(*args, **kwargs)

    async def _submit_run(self, flow_run: FlowRun) -> None:
        deployment: DeploymentResponse | None = None
        if flow_run.deployment_id is not None:
            try:
                deployment = await self.client.read_deployment(flow_run.deployment_id)
            except ObjectNotFound:
                return await super()._submit_run(flow_run)  # Prefect cancels it
        # Read at most as often as runs start: a fresh fetch of the protected branch each time.
        reason = await anyio.to_thread.run_sync(
            refusal_reason, self.trust_roots, flow_run, deployment, self._work_pool_name
        )
        if isinstance(reason, Launch):
            self._launches[flow_run.id] = reason
            return await super()._submit_run(flow_run)
        try:
            await self._refuse(flow_run, reason)
        finally:
            self._release_limit_slot(flow_run.id)
            self._submitting_flow_run_ids.discard(flow_run.id)
            if self._cancelling_observer is not None:
                self._cancelling_observer.remove_in_flight_flow_run_id(flow_run.id)
        return None

    async def _refuse(self, flow_run: FlowRun, reason: str) -> None:
        line = f"refused flow run {flow_run.id} ({flow_run.name}): {reason}"
        AUDIT.warning("%s", line)
        self._logger.warning("audit: %s", line)
        self.get_flow_run_logger(flow_run).error("%s", reason)
        if self.audit_log is not None:
            entry = {
                "at": datetime.now(UTC).isoformat(),
                "kind": "refused",
                "worker": self.name,
                "flow_run": str(flow_run.id),
                "deployment": str(flow_run.deployment_id),
                "reason": reason,
            }
            self.audit_log.parent.mkdir(parents=True, exist_ok=True)
            with self.audit_log.open("a", encoding="utf-8") as out:
                out.write(json.dumps(entry) + "\n")
        with contextlib.suppress(Abort):  # already final: nothing ran either way
            await propose_state(self.client, Failed(message=reason), flow_run_id=flow_run.id)

    async def run(
        self,
        flow_run: FlowRun,
        configuration: ProcessJobConfiguration,
        task_status: anyio.abc.TaskStatus[int] | None = None,
    ) -> ProcessWorkerResult:
        launch = self._launches.pop(flow_run.id, None)
        if launch is None:  # not through _submit_run's check: never started
            msg = f"flow run {flow_run.id} was not checked against the protected branch"
            raise ConfigError(msg)
        # After the job variables were applied: the worker's trust file, whatever they said;
        # and the run starts in the declared directory with the declared entrypoint, so it
        # reads neither pull steps nor entrypoint from the API (which may have changed them
        # since the check).
        configuration.env = {
            **configuration.env,
            TRUST_FILE_ENV: str(self.trust_file),
            "PREFECT__FLOW_ENTRYPOINT": launch.entrypoint,
        }
        configuration.working_dir = launch.directory
        return await super().run(flow_run, configuration, task_status)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stack.trusted_worker")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="poll a work pool and run what the branch declares")
    start.add_argument("--pool", required=True)
    start.add_argument("--name", help="the worker's name (default: Prefect's, unique)")
    start.add_argument("--trust-file", required=True, type=Path)
    start.add_argument("--audit-log", type=Path)
    start.add_argument("--limit", type=int)
    digest = commands.add_parser(
        "block-digest", help="print a saved deploy-target block's digest, for the trust file"
    )
    digest.add_argument("block", choices=[DOCKER_TARGET_BLOCK, KUBERNETES_TARGET_BLOCK])
    return parser.parse_args(argv)


def _block_digest(name: str) -> str:
    kind = KubernetesTarget if name == KUBERNETES_TARGET_BLOCK else DockerTarget
    try:
        return block_digest(cast("Block", kind.load(name)))
    except ValueError as exc:
        msg = f"no block {name!r} is saved: {exc}"
        raise ConfigError(msg) from exc


async def _start(args: argparse.Namespace) -> None:
    worker = TrustedProcessWorker(
        work_pool_name=args.pool,
        name=args.name,
        limit=args.limit,
        heartbeat_interval_seconds=int(PREFECT_WORKER_HEARTBEAT_SECONDS.value()),
        create_pool_if_not_found=False,
        trust_file=args.trust_file,
        audit_log=args.audit_log,
    )
    await worker.start()  # enters the worker's context itself


def main(argv: list[str] | None = None) -> int:
    """Start the worker; returns when it stops."""
    args = _arguments(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    try:
        if args.command == "block-digest":
            print(f"{args.block}: {_block_digest(args.block)}")
            return 0
        asyncio.run(_start(args))
    except PipelineError as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

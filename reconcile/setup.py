"""`cicd setup`: make a Prefect server ready to run the pipeline, idempotently.

What a server needs: the work pools (process, Docker, Kubernetes, each with its base job
template), the global concurrency limits the flows take, the configuration blocks, the
automation that marks runs of vanished workers Crashed, and every deployment of
prefect.yaml. Each item is read from the server and compared with what it should be; only
the differences are written, and a dry run writes nothing.

The deployments are registered through the client from prefect.yaml itself (entrypoint,
parameters, schedules, tags, work pool, job variables and the pull step, kept as written:
`{{ $ELICE_REPO }}` is resolved by each worker, not baked in by whoever ran setup), which
is what makes a dry run and the "unchanged" answer possible; `prefect deploy --all`
registers the same deployments (tests/ops/test_prefect_yaml.py checks the two agree).
"""

from __future__ import annotations

import copy
import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, cast

import yaml
from prefect import Flow
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import (
    DeploymentScheduleCreate,
    DeploymentScheduleUpdate,
    DeploymentUpdate,
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
    WorkPoolCreate,
    WorkPoolUpdate,
)
from prefect.client.schemas.objects import DeploymentSchedule, StateType
from prefect.client.schemas.responses import DeploymentResponse
from prefect.client.schemas.schedules import (
    SCHEDULE_TYPES,
    CronSchedule,
    IntervalSchedule,
    RRuleSchedule,
)
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.callables import parameter_schema
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from blocks.catalog import ServiceCatalog
from blocks.config import (
    CATALOG_BLOCK,
    ENVIRONMENTS_BLOCK,
    PipelineConfig,
    default_config_file,
    load_config,
    save_as_blocks,
)
from blocks.environments import EnvironmentCatalog
from blocks.kubernetes_target import KubernetesTarget
from core.errors import ConfigError, ToolError
from reconcile.pools import PROCESS_POOL, PRODUCTION_POOL
from tasks.deploy.kubernetes import KubernetesDeployer
from tasks.deploy.target import KUBERNETES_TARGET_BLOCK
from tasks.locks import lock_name

CHECKOUT = Path(__file__).resolve().parents[1]
PREFECT_FILE = CHECKOUT / "prefect.yaml"
DOCKER_POOL = "elice-docker"
KUBERNETES_POOL = "elice-kubernetes"

Kind = Literal["work-pool", "concurrency-limit", "block", "deployment", "automation"]
Action = Literal["create", "update", "unchanged"]

_DEPLOYMENT_KEYS = {
    "name",
    "entrypoint",
    "description",
    "tags",
    "parameters",
    "schedules",
    "work_pool",
    "pull",
    "paused",
    "enforce_parameter_schema",
    "version",
}
_COMPARED_SCHEDULE_KEYS = {
    "cron": ("cron", "timezone", "day_or"),
    "interval": ("interval", "anchor_date", "timezone"),
    "rrule": ("rrule", "timezone"),
}


class SetupChange(BaseModel):
    """One item of a server's setup and what `ensure_setup` did (or would do) to it."""

    model_config = ConfigDict(frozen=True)

    kind: Kind = Field(description="work-pool, concurrency-limit, block, deployment or automation")
    name: str = Field(description="The item's name on the server (flow/deployment for these)")
    action: Action = Field(description="create, update or unchanged")
    detail: str = Field(default="", description="What it is, or which fields differ")


class DeploymentSpec(BaseModel):
    """One deployment of prefect.yaml, resolved to what the server should hold."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str
    flow_name: str
    entrypoint: str
    description: str | None
    tags: list[str]
    parameters: dict[str, Any]
    schedules: list[tuple[SCHEDULE_TYPES, bool, tuple[str, ...]]] = Field(
        description="(schedule, active, the fields prefect.yaml set and setup compares)"
    )
    work_pool_name: str
    work_queue_name: str | None
    job_variables: dict[str, Any]
    pull_steps: list[dict[str, Any]]
    paused: bool
    enforce_parameter_schema: bool
    parameter_openapi_schema: dict[str, Any]

    @property
    def full_name(self) -> str:
        """`flow/deployment`, as `prefect deployment run` names it."""
        return f"{self.flow_name}/{self.name}"


Apply = Callable[[SyncPrefectClient], None]
Step = tuple[SetupChange, Apply | None]


def _json(value: Any) -> Any:
    """`value` as plain JSON data, so server answers and local values compare equal."""
    return json.loads(json.dumps(value, default=str, sort_keys=True))


# --- prefect.yaml ----------------------------------------------------------------------


def _load_flow(entrypoint: str, where: str) -> Flow[..., Any]:
    path, _, func = entrypoint.partition(":")
    if not path.endswith(".py") or not func:
        msg = f"{where}: entrypoint {entrypoint!r} is not path/to/file.py:flow_function"
        raise ConfigError(msg)
    module = path.removesuffix(".py").replace("/", ".")
    try:
        found = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as exc:
        msg = f"{where}: entrypoint {entrypoint!r} cannot be loaded: {exc}"
        raise ConfigError(msg) from exc
    if not isinstance(found, Flow):
        msg = f"{where}: entrypoint {entrypoint!r} is not a Prefect flow"
        raise ConfigError(msg)
    return found


def _schedule(entry: Any, where: str) -> tuple[SCHEDULE_TYPES, bool, tuple[str, ...]]:
    if not isinstance(entry, dict):
        msg = f"{where}: expected a mapping, got {type(entry).__name__}"
        raise ConfigError(msg)
    given = {k: v for k, v in entry.items() if k != "active"}
    active = bool(entry.get("active", True))
    schedule: SCHEDULE_TYPES
    try:
        if "cron" in given:
            kind, schedule = "cron", CronSchedule(**given)
        elif "interval" in given:
            kind, schedule = "interval", IntervalSchedule(**given)
        elif "rrule" in given:
            kind, schedule = "rrule", RRuleSchedule(**given)
        else:
            msg = f"{where}: a schedule needs cron, interval or rrule, got {sorted(given)}"
            raise ConfigError(msg)
    except ValidationError as exc:
        msg = f"{where}: invalid schedule: {exc.errors()[0]['msg']}"
        raise ConfigError(msg) from exc
    # What prefect.yaml leaves out (an interval's anchor date) the server picks; compare
    # only what the file says, plus a cron's defaults, which are fixed.
    keys = tuple(
        k for k in _COMPARED_SCHEDULE_KEYS[kind] if k in given or kind in ("cron", "rrule")
    )
    return schedule, active, keys


def read_prefect_file(path: Path = PREFECT_FILE) -> list[DeploymentSpec]:
    """The deployments of a prefect.yaml, as the server should hold them.

    Raises:
        ConfigError: the file, a deployment or a field is invalid or not supported here
            (build, push, triggers: use `prefect deploy` for those).
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        msg = f"{path}: cannot read deployments: {exc}"
        raise ConfigError(msg) from exc
    if not isinstance(data, dict) or not isinstance(data.get("deployments"), list):
        msg = f"{path}: deployments: expected a list"
        raise ConfigError(msg)
    for key in ("build", "push"):
        if data.get(key):
            msg = f"{path}: {key}: steps are not supported by cicd setup; use `prefect deploy`"
            raise ConfigError(msg)
    pull = data.get("pull") or []
    specs = []
    for index, raw in enumerate(data["deployments"]):
        where = f"{path}: deployments[{index}]"
        if not isinstance(raw, dict):
            msg = f"{where}: expected a mapping"
            raise ConfigError(msg)
        unknown = sorted(set(raw) - _DEPLOYMENT_KEYS)
        if unknown:
            msg = f"{where}: {unknown} not supported by cicd setup; use `prefect deploy`"
            raise ConfigError(msg)
        steps = raw.get("pull", pull)
        if not isinstance(steps, list):
            msg = f"{where}: pull: expected a list of steps"
            raise ConfigError(msg)
        config = raw
        for required in ("name", "entrypoint"):
            if not config.get(required):
                msg = f"{where}: {required}: field required"
                raise ConfigError(msg)
        flow = _load_flow(config["entrypoint"], where)
        pool = config.get("work_pool") or {}
        if not pool.get("name"):
            msg = f"{where}: work_pool.name: field required"
            raise ConfigError(msg)
        schedules = [
            _schedule(entry, f"{where}: schedules[{i}]")
            for i, entry in enumerate(config.get("schedules") or [])
        ]
        specs.append(
            DeploymentSpec(
                name=config["name"],
                flow_name=flow.name,
                entrypoint=config["entrypoint"],
                description=config.get("description") or flow.description,
                tags=list(config.get("tags") or []),
                parameters=dict(config.get("parameters") or {}),
                schedules=schedules,
                work_pool_name=pool["name"],
                work_queue_name=pool.get("work_queue_name"),
                job_variables=dict(pool.get("job_variables") or {}),
                pull_steps=list(steps),
                paused=bool(config.get("paused", False)),
                enforce_parameter_schema=bool(config.get("enforce_parameter_schema", True)),
                parameter_openapi_schema=parameter_schema(flow).model_dump(exclude_unset=True),
            )
        )
    names = [s.full_name for s in specs]
    if len(set(names)) != len(names):
        msg = f"{path}: deployment names repeat: {sorted(n for n in names if names.count(n) > 1)}"
        raise ConfigError(msg)
    return specs


# --- work pools ------------------------------------------------------------------------


def pool_templates(
    *, local_worker_pool: bool = True, worker_image: str | None = None
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Pool name -> (type, base job template): the workers' own default templates.

    Args:
        local_worker_pool: include the process pools the local workers poll (CI and
            staging's, production's).
        worker_image: the default image of the Docker and Kubernetes pools' flow runs
            (the worker image, worker/Dockerfile); None keeps Prefect's default.
    """
    from prefect.workers.process import ProcessWorker  # noqa: PLC0415 - worker classes load
    from prefect_docker.worker import DockerWorker  # noqa: PLC0415 - their collections
    from prefect_kubernetes.worker import KubernetesWorker  # noqa: PLC0415 - on demand

    pools: dict[str, tuple[str, dict[str, Any]]] = {}
    if local_worker_pool:
        for name in (PROCESS_POOL, PRODUCTION_POOL):
            pools[name] = ("process", ProcessWorker.get_default_base_job_template())
    for name, worker in ((DOCKER_POOL, DockerWorker), (KUBERNETES_POOL, KubernetesWorker)):
        template = copy.deepcopy(worker.get_default_base_job_template())
        if worker_image:
            template["variables"]["properties"]["image"]["default"] = worker_image
        pools[name] = (str(worker.type), template)
    return pools


def _pool_description(kind: str) -> str:
    return f"elice-devops: {kind} work pool (created by `cicd setup`)"


def _plan_pool(client: SyncPrefectClient, name: str, kind: str, template: dict[str, Any]) -> Step:
    description = _pool_description(kind)
    try:
        pool = client.read_work_pool(name)
    except ObjectNotFound:

        def create(c: SyncPrefectClient) -> None:
            c.create_work_pool(
                WorkPoolCreate(
                    name=name, type=kind, base_job_template=template, description=description
                )
            )

        return SetupChange(kind="work-pool", name=name, action="create", detail=kind), create
    if pool.type != kind:
        msg = (
            f"work pool {name} exists with type {pool.type!r}, not {kind!r}; a pool's type "
            "cannot change: delete it (`prefect work-pool delete`) and run setup again"
        )
        raise ConfigError(msg)
    differs = []
    if _json(pool.base_job_template) != _json(template):
        differs.append("base job template")
    if pool.description != description:
        differs.append("description")
    if not differs:
        return SetupChange(kind="work-pool", name=name, action="unchanged", detail=kind), None

    def update(c: SyncPrefectClient) -> None:
        c.update_work_pool(
            name, WorkPoolUpdate(base_job_template=template, description=description)
        )

    detail = f"{kind}: " + ", ".join(differs)
    return SetupChange(kind="work-pool", name=name, action="update", detail=detail), update


# --- concurrency limits ----------------------------------------------------------------


def limit_names(config: PipelineConfig) -> list[str]:
    """The global concurrency limits the flows take, one per environment (tasks/locks.py)."""
    return [lock_name(env.name) for env in config.environments.environments]


def _plan_limit(client: SyncPrefectClient, name: str) -> Step:
    try:
        limit = client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:

        def create(c: SyncPrefectClient) -> None:
            c.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=1, active=True)
            )

        change = SetupChange(kind="concurrency-limit", name=name, action="create", detail="1 slot")
        return change, create
    if limit.limit == 1 and limit.active:
        change = SetupChange(
            kind="concurrency-limit", name=name, action="unchanged", detail="1 slot"
        )
        return change, None

    def update(c: SyncPrefectClient) -> None:
        c.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=1, active=True))

    was = f"{limit.limit} slots{'' if limit.active else ', inactive'}"
    change = SetupChange(
        kind="concurrency-limit", name=name, action="update", detail=f"{was} -> 1 slot"
    )
    return change, update


# --- the automation that notices vanished runs ---------------------------------------

VANISHED_RUNS = "elice-vanished-runs"
HEARTBEAT_S = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY of the workers (stack/worker.py)
VANISHED_AFTER_S = 3 * HEARTBEAT_S
_FINAL_EVENTS = ("Completed", "Failed", "Cancelled", "Crashed")


def vanished_runs_automation() -> AutomationCore:
    """Mark a flow run Crashed when its heartbeats stop: its process, worker or machine died.

    A flow run's process sends a heartbeat every HEARTBEAT_S seconds, also while it is
    paused for an approval; nothing else reports a SIGKILLed process or a lost machine, so
    without this the run stays Running for good and whatever waits on it (a CI run's
    fan-out) waits with it.
    """
    return AutomationCore(
        name=VANISHED_RUNS,
        description=(
            f"Marks a flow run Crashed when it sent no heartbeat for {VANISHED_AFTER_S} s "
            "(its worker, process or machine is gone). Created by `cicd setup`."
        ),
        enabled=True,
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                *(f"prefect.flow-run.{name}" for name in _FINAL_EVENTS),
            },
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=VANISHED_AFTER_S,
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=(
                    f"no heartbeat for {VANISHED_AFTER_S} s: the process running this flow "
                    "run, its worker or its machine is gone"
                ),
            )
        ],
    )


def _automation_key(automation: AutomationCore) -> str:
    fields = automation.model_dump(include={"description", "enabled", "trigger", "actions"})

    def plain(value: object) -> object:
        return sorted(value) if isinstance(value, (set, frozenset)) else str(value)

    return json.dumps(fields, sort_keys=True, default=plain)


def _plan_automation(client: SyncPrefectClient) -> Step:
    wanted = vanished_runs_automation()
    found = client.read_automations_by_name(VANISHED_RUNS)
    detail = f"flow runs silent for {VANISHED_AFTER_S} s -> Crashed"
    if not found:

        def create(c: SyncPrefectClient) -> None:
            c.create_automation(wanted)

        return SetupChange(
            kind="automation", name=VANISHED_RUNS, action="create", detail=detail
        ), create
    current = AutomationCore.model_validate(found[0].model_dump(exclude={"id"}))
    if _automation_key(current) == _automation_key(wanted):
        return SetupChange(
            kind="automation", name=VANISHED_RUNS, action="unchanged", detail=detail
        ), None
    automation_id = found[0].id

    def update(c: SyncPrefectClient) -> None:
        c.update_automation(automation_id, wanted)

    return SetupChange(
        kind="automation", name=VANISHED_RUNS, action="update", detail=detail
    ), update


# --- blocks ----------------------------------------------------------------------------


def _plan_blocks(config: PipelineConfig) -> list[Step]:
    wanted: list[tuple[str, type[ServiceCatalog] | type[EnvironmentCatalog], Any, str]] = [
        (CATALOG_BLOCK, ServiceCatalog, config.catalog, f"{len(config.catalog.services)} services"),
        (
            ENVIRONMENTS_BLOCK,
            EnvironmentCatalog,
            config.environments,
            f"{len(config.environments.environments)} environments",
        ),
    ]
    steps: list[Step] = []
    for name, block_cls, value, what in wanted:
        try:
            saved = cast("BaseModel", block_cls.load(name))
        except ValueError:  # none saved under this name
            action: Action = "create"
        except RuntimeError:  # saved by an older version, invalid now: overwritten
            action = "update"
        else:
            fields = set(type(value).model_fields)  # not the block document's own metadata
            same = _json(saved.model_dump(mode="json", include=fields)) == _json(
                value.model_dump(mode="json", include=fields)
            )
            action = "unchanged" if same else "update"
        steps.append((SetupChange(kind="block", name=name, action=action, detail=what), None))
    if any(change.action != "unchanged" for change, _ in steps):

        def save(_: SyncPrefectClient) -> None:
            save_as_blocks(config)

        steps[-1] = (steps[-1][0], save)
    return steps


def _plan_cluster(cluster: KubernetesTarget) -> Step:
    """The `elice-kubernetes` block: the kubeconfig kept as a secret, settings kept."""
    try:
        saved: KubernetesTarget | None = cast(
            "KubernetesTarget", KubernetesTarget.load(KUBERNETES_TARGET_BLOCK)
        )
    except (ValueError, RuntimeError):  # none saved, or saved by an older version
        saved = None
    wanted = cluster
    if saved is not None:  # keep the saved tuning; replace only what a kubeconfig says
        wanted = saved.model_copy(
            update={"kubeconfig": cluster.kubeconfig, "context": cluster.context}
        )
    secret = cluster.kubeconfig.get_secret_value() if cluster.kubeconfig else None
    same = (
        saved is not None
        and saved.kubeconfig is not None
        and saved.kubeconfig.get_secret_value() == secret
        and saved.context == cluster.context
    )
    action: Action = "unchanged" if same else ("update" if saved is not None else "create")
    change = SetupChange(
        kind="block",
        name=KUBERNETES_TARGET_BLOCK,
        action=action,
        detail=f"kubeconfig (secret), context {cluster.context}",
    )
    if same:
        return change, None

    def save(_: SyncPrefectClient) -> None:
        wanted.save(KUBERNETES_TARGET_BLOCK, overwrite=True)

    return change, save


# --- deployments -----------------------------------------------------------------------


def _schedule_differs(
    saved: list[DeploymentSchedule], wanted: list[tuple[SCHEDULE_TYPES, bool, tuple[str, ...]]]
) -> bool:
    def key(schedule: SCHEDULE_TYPES, active: bool, fields: tuple[str, ...], params: Any) -> str:
        data = schedule.model_dump(mode="json")
        kept = {f: data.get(f) for f in fields}
        return json.dumps([type(schedule).__name__, kept, active, params], sort_keys=True)

    mine = sorted(key(s, a, f, {}) for s, a, f in wanted)
    fields = {type(s).__name__: f for s, _, f in wanted}
    theirs = sorted(
        key(
            s.schedule,
            s.active,
            fields.get(type(s.schedule).__name__, ()),
            _json(s.parameters or {}),
        )
        for s in saved
    )
    return mine != theirs


def _deployment_differences(saved: DeploymentResponse, spec: DeploymentSpec) -> list[str]:
    pairs: dict[str, tuple[Any, Any]] = {
        "entrypoint": (saved.entrypoint, spec.entrypoint),
        "description": (saved.description, spec.description),
        "tags": (saved.tags, spec.tags),
        "parameters": (saved.parameters, spec.parameters),
        "work pool": (saved.work_pool_name, spec.work_pool_name),
        "work queue": (saved.work_queue_name, spec.work_queue_name or "default"),
        "job variables": (saved.job_variables or {}, spec.job_variables),
        "pull steps": (saved.pull_steps or [], spec.pull_steps),
        "paused": (saved.paused, spec.paused),
        "parameter enforcement": (saved.enforce_parameter_schema, spec.enforce_parameter_schema),
        "parameter schema": (saved.parameter_openapi_schema or {}, spec.parameter_openapi_schema),
    }
    differs = [field for field, (old, new) in pairs.items() if _json(old) != _json(new)]
    if _schedule_differs(saved.schedules, spec.schedules):
        differs.append("schedules")
    return differs


def _plan_deployment(client: SyncPrefectClient, spec: DeploymentSpec) -> Step:
    summary = f"pool {spec.work_pool_name}" + (
        f", {len(spec.schedules)} schedule(s)" if spec.schedules else ""
    )
    try:
        saved = client.read_deployment_by_name(spec.full_name)
    except ObjectNotFound:

        def create(c: SyncPrefectClient) -> None:
            flow_id = c.create_flow_from_name(spec.flow_name)
            c.create_deployment(
                flow_id=flow_id,
                name=spec.name,
                schedules=[
                    DeploymentScheduleCreate(schedule=s, active=a) for s, a, _ in spec.schedules
                ],
                parameters=spec.parameters,
                description=spec.description,
                work_queue_name=spec.work_queue_name,
                work_pool_name=spec.work_pool_name,
                tags=spec.tags,
                entrypoint=spec.entrypoint,
                parameter_openapi_schema=spec.parameter_openapi_schema,
                paused=spec.paused,
                pull_steps=spec.pull_steps,
                enforce_parameter_schema=spec.enforce_parameter_schema,
                job_variables=spec.job_variables,
            )

        change = SetupChange(
            kind="deployment", name=spec.full_name, action="create", detail=summary
        )
        return change, create
    differs = _deployment_differences(saved, spec)
    if not differs:
        change = SetupChange(
            kind="deployment", name=spec.full_name, action="unchanged", detail=summary
        )
        return change, None

    def update(c: SyncPrefectClient) -> None:
        c.update_deployment(
            saved.id,
            DeploymentUpdate(
                description=spec.description,
                parameters=spec.parameters,
                paused=spec.paused,
                schedules=[
                    DeploymentScheduleUpdate(schedule=s, active=a) for s, a, _ in spec.schedules
                ],
                tags=spec.tags,
                work_queue_name=spec.work_queue_name,
                work_pool_name=spec.work_pool_name,
                job_variables=spec.job_variables,
                entrypoint=spec.entrypoint,
                enforce_parameter_schema=spec.enforce_parameter_schema,
                parameter_openapi_schema=spec.parameter_openapi_schema,
                pull_steps=spec.pull_steps,
            ),
        )

    change = SetupChange(
        kind="deployment", name=spec.full_name, action="update", detail=", ".join(differs)
    )
    return change, update


# --- the whole setup -------------------------------------------------------------------


def _setup_config() -> PipelineConfig:
    """The configuration to save as blocks: ELICE_CONFIG's file or the embedded one, never
    the saved blocks themselves."""
    choice = os.environ.get("ELICE_CONFIG")
    return load_config(choice if choice and choice != "blocks" else str(default_config_file()))


def _check_cluster(cluster: KubernetesTarget, cfg: PipelineConfig) -> None:
    """Try a kubeconfig against its server before it is saved (a kubeconfig signed by
    another CA used to fail only at the first deploy): the version, and an access review
    in the namespaces of the kubernetes environments (all environments' when none is)."""
    envs = cfg.environments.environments
    namespaces = [e.namespace for e in envs if e.target == "kubernetes"] or [
        e.namespace for e in envs
    ]
    KubernetesDeployer(cluster.model_copy(update={"retries": 0}), retry_budget_s=0).check(
        namespaces
    )


def ensure_setup(
    api_url: str | None = None,
    *,
    dry_run: bool = False,
    local_worker_pool: bool = True,
    worker_image: str | None = None,
    config: PipelineConfig | None = None,
    prefect_file: Path = PREFECT_FILE,
    kubeconfig: Path | None = None,
    kube_context: str | None = None,
) -> list[SetupChange]:
    """Make the Prefect server at `api_url` (default PREFECT_API_URL) ready for the pipeline.

    Creates or updates the work pools, the global concurrency limits (`deploy-<env>`, 1
    slot each, held by promotions, rollbacks and CI's deploys), the configuration blocks
    and every deployment of `prefect_file`, writing only what differs. Everything is
    planned (and checked) before the first write.

    Args:
        dry_run: report what would change; change nothing.
        local_worker_pool: also the process pools the local workers poll: `elice-process`
            (CI, dev, staging) and `elice-production`.
        worker_image: default image of the Docker and Kubernetes pools (see `pool_templates`).
        config: the configuration to save as blocks (default: ELICE_CONFIG or the
            embedded file; never the saved blocks).
        kubeconfig: the cluster of the kubernetes target: saved in the block
            `elice-kubernetes` as a secret, with `kube_context` (default: its current one).

    Raises:
        ConfigError: no API is configured, the kubeconfig does not work with its server
            (checked before anything is written), or prefect.yaml or the server's state cannot be
            reconciled (a pool of another type; a deployment's pool neither exists nor is
            set up here).
        ToolError: the server does not answer.
    """
    url = api_url or PREFECT_API_URL.value()
    if not url:
        msg = "no Prefect API: set PREFECT_API_URL or pass the server's API URL"
        raise ConfigError(msg)
    cfg = config or _setup_config()
    specs = read_prefect_file(prefect_file)
    cluster = KubernetesTarget.from_kubeconfig(kubeconfig, kube_context) if kubeconfig else None
    if cluster is not None:
        _check_cluster(cluster, cfg)
    pools = pool_templates(local_worker_pool=local_worker_pool, worker_image=worker_image)
    with (
        temporary_settings(updates={PREFECT_API_URL: url}),
        get_client(sync_client=True) as client,
    ):
        failure = client.api_healthcheck()
        if failure is not None:
            msg = f"Prefect API at {url} does not answer: {failure}"
            raise ToolError(msg)
        steps = [_plan_pool(client, name, kind, t) for name, (kind, t) in pools.items()]
        steps += [_plan_limit(client, name) for name in limit_names(cfg)]
        steps += _plan_blocks(cfg)
        if cluster is not None:
            steps.append(_plan_cluster(cluster))
        steps.append(_plan_automation(client))
        for spec in specs:
            if spec.work_pool_name not in pools:
                try:
                    client.read_work_pool(spec.work_pool_name)
                except ObjectNotFound as exc:
                    msg = (
                        f"deployment {spec.full_name} uses work pool {spec.work_pool_name}, "
                        f"which does not exist on {url} and is not set up here "
                        "(local_worker_pool=False?)"
                    )
                    raise ConfigError(msg) from exc
            steps.append(_plan_deployment(client, spec))
        if not dry_run:
            for _, apply in steps:
                if apply is not None:
                    apply(client)
    return [change for change, _ in steps]

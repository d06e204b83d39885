"""The `kubernetes` deploy target: server-side apply, rollout wait, rollback to the previous digest.

`rollout_status` and `pod_problems` judge plain dicts read from the API server and are
tested without a cluster; `KubernetesDeployer` drives the official client.

What a real API server does, and how it is judged here:
- a rollout (a deploy's or a restore's) is waited for at most the target's
  `rollout_deadline_s`; the controller's ProgressDeadlineExceeded verdict (the
  manifests' `progressDeadlineSeconds`) ends a failing one sooner;
- that condition counts only once the progress deadline has passed since this apply:
  rolling back, the controller shows the failed rollout's condition at the new
  generation for a moment;
- a rollout is done when the environment's minimum replicas (the HPA's minReplicas)
  are available, not when the Deployment's first replica is (the HPA raises
  replicas at its next sync);
- API calls are retried for the target's `api_retry_budget_s` at least (default
  `API_RETRY_BUDGET_S`, longer than an API server restart takes);
- only a Deployment this pipeline applied (its field manager `FIELD_MANAGER` in the
  managedFields) is taken as the previous release; any other is refused before a write;
- fields another manager added to the service's Deployment, Service, ConfigMap or HPA
  (`kubectl set env`, `kubectl edit`, a label) are drift (`DRIFT_KINDS`): `live()`
  reports them, the next deploy removes them after its apply;
- an apply that fails part-way deletes the objects it created;
- the environment's registry login is written to the namespace's pull secret before
  an apply (tasks/deploy/pull_secret.py), and the Deployment names it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from blocks.catalog import ServiceSpec
from blocks.environments import EnvironmentSpec
from blocks.kubernetes_target import KubernetesTarget
from blocks.registry import OciRegistry
from core.errors import (
    ConfigError,
    DeployError,
    KubernetesApiError,
    ManifestError,
    RolloutFailed,
)
from core.records import DeployedService, ImageRef, utcnow
from tasks.deploy.manifests import (
    ANNOTATION_PREFIX,
    APP_CONTAINER,
    CANARY_TRACK,
    DIGEST_REF,
    NAME_LABEL,
    SERVICE_PORT,
    TRACK_LABEL,
    canary_deployment,
    canary_name,
    containers,
    render_overlay,
    service_objects,
)
from tasks.deploy.pull_secret import PULL_NAME, secret_object, stale
from tasks.deploy.service_proxy import service_path, service_proxy
from tasks.images import login_for
from tasks.masking import scrub_masked
from tasks.process import run_logger

FIELD_MANAGER = "elice-devops"
DEFAULT_PROGRESS_DEADLINE_S = 600  # Kubernetes' default progressDeadlineSeconds
CONTROLLER_MANAGERS = frozenset({"kube-controller-manager"})  # revision annotation, scale
POD_GONE_GRACE_S = 30.0  # beyond the pods' termination grace period
RETRY_STATUSES = frozenset({409, 429, 500, 502, 503, 504})
# (apiVersion, kind) -> (client API class, method suffix, namespaced)
RESOURCES: dict[tuple[str, str], tuple[str, str, bool]] = {
    ("v1", "Namespace"): ("CoreV1Api", "namespace", False),
    ("v1", "ServiceAccount"): ("CoreV1Api", "namespaced_service_account", True),
    ("v1", "ConfigMap"): ("CoreV1Api", "namespaced_config_map", True),
    ("v1", "PersistentVolumeClaim"): ("CoreV1Api", "namespaced_persistent_volume_claim", True),
    ("v1", "Service"): ("CoreV1Api", "namespaced_service", True),
    ("apps/v1", "Deployment"): ("AppsV1Api", "namespaced_deployment", True),
    ("autoscaling/v2", "HorizontalPodAutoscaler"): (
        "AutoscalingV2Api",
        "namespaced_horizontal_pod_autoscaler",
        True,
    ),
    ("policy/v1", "PodDisruptionBudget"): ("PolicyV1Api", "namespaced_pod_disruption_budget", True),
}


# The service's objects looked at for drift, each named like the service.
DRIFT_KINDS: tuple[tuple[str, str], ...] = (
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("v1", "ConfigMap"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
)


# --------------------------------------------------------------------------- rollout


@dataclass(frozen=True)
class RolloutStatus:
    """Where a Deployment's rollout stands, as `kubectl rollout status` judges it."""

    done: bool
    failed: bool
    message: str


def rollout_status(
    deployment: Mapping[str, Any],
    expected_image: str,
    *,
    min_available: int = 0,
    deadline_passed: bool = True,
) -> RolloutStatus:
    """Judge a Deployment read from the API server against the image we applied.

    Args:
        min_available: replicas that must be available (the environment's minimum),
            whatever the Deployment's replicas say now.
        deadline_passed: the progress deadline has passed since this apply; before it,
            a ProgressDeadlineExceeded condition is a stale one (a rollback's) and ignored.
    """
    meta = deployment.get("metadata", {})
    spec = deployment.get("spec", {})
    status = deployment.get("status") or {}
    images = [c.get("image") for c in containers(deployment)]
    if expected_image not in images:
        return RolloutStatus(False, True, f"the Deployment now runs {images}, not {expected_image}")
    if status.get("observedGeneration", 0) < meta.get("generation", 0):
        return RolloutStatus(False, False, "waiting for the controller to see the new spec")
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == (
            "ProgressDeadlineExceeded"
        ):
            deadline = spec.get("progressDeadlineSeconds", DEFAULT_PROGRESS_DEADLINE_S)
            if not deadline_passed:
                return RolloutStatus(
                    False, False, "ProgressDeadlineExceeded before the deadline: stale, waiting"
                )
            return RolloutStatus(
                False,
                True,
                f"progress deadline ({deadline}s) exceeded: {condition.get('message', '')}",
            )
    wanted = max(spec.get("replicas", 1), min_available)
    updated = status.get("updatedReplicas", 0)
    total = status.get("replicas", 0)
    available = status.get("availableReplicas", 0)
    if updated < wanted:
        return RolloutStatus(False, False, f"{updated} of {wanted} replicas updated")
    if total > updated:
        return RolloutStatus(False, False, f"{total - updated} old replicas pending termination")
    if available < updated:
        return RolloutStatus(False, False, f"{available} of {updated} updated replicas available")
    return RolloutStatus(True, False, f"{available} of {wanted} replicas available")


def progress_deadline_s(objects: Iterable[Mapping[str, Any]]) -> float:
    """The Deployment's progressDeadlineSeconds in the rendered objects (600 if unset)."""
    for obj in objects:
        if obj.get("kind") == "Deployment":
            value = (obj.get("spec") or {}).get("progressDeadlineSeconds")
            return float(value if value is not None else DEFAULT_PROGRESS_DEADLINE_S)
    return float(DEFAULT_PROGRESS_DEADLINE_S)


def minimum_replicas(objects: Iterable[Mapping[str, Any]], service: str) -> int:
    """Replicas the environment wants at least: its HPA's minReplicas, else the Deployment's."""
    found = 1
    for obj in objects:
        spec = obj.get("spec") or {}
        if obj.get("kind") == "HorizontalPodAutoscaler" and (
            (spec.get("scaleTargetRef") or {}).get("name") == service
        ):
            return int(spec.get("minReplicas", 1))
        if obj.get("kind") == "Deployment" and spec.get("replicas") is not None:
            found = int(spec["replicas"])
    return found


def pod_problems(pods: Iterable[Mapping[str, Any]], image: str | None = None) -> list[str]:
    """Why pods (of `image`, when given) are not ready: waiting and crash reasons."""
    problems = []
    for pod in pods:
        name = pod.get("metadata", {}).get("name", "?")
        spec_images = {c.get("image") for c in pod.get("spec", {}).get("containers", [])}
        if image is not None and image not in spec_images:
            continue
        for cs in pod.get("status", {}).get("containerStatuses") or []:
            state = cs.get("state") or {}
            waiting = state.get("waiting")
            terminated = (cs.get("lastState") or {}).get("terminated") or state.get("terminated")
            if waiting and waiting.get("reason"):
                detail = waiting.get("message") or ""
                if terminated:
                    detail = f"{detail} last exit {terminated.get('exitCode')}".strip()
                problems.append(f"{name}: {waiting['reason']}" + (f" ({detail})" if detail else ""))
            elif not cs.get("ready") and terminated:
                problems.append(f"{name}: {terminated.get('reason', 'Terminated')}")
    return sorted(set(problems))


# A new pod waiting for one of these will not become ready by waiting: the image cannot
# be pulled, its container keeps crashing, or its configuration is missing.
FATAL_WAITING = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "CreateContainerConfigError",
        "InvalidImageName",
    }
)


def fatal_pod_problems(pods: Iterable[Mapping[str, Any]], image: str) -> list[str]:
    """Pods of `image` stuck for a reason waiting will not cure (FATAL_WAITING)."""
    fatal = []
    for pod in pods:
        if pod.get("metadata", {}).get("deletionTimestamp"):
            continue
        if image not in {c.get("image") for c in pod.get("spec", {}).get("containers", [])}:
            continue
        for cs in pod.get("status", {}).get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in FATAL_WAITING:
                fatal.append(pod)
                break
    return pod_problems(fatal, image)


# --------------------------------------------------------------------------- ownership


def _managers(obj: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The managedFields entries of the object itself (not of its status or scale)."""
    return [
        entry
        for entry in obj.get("metadata", {}).get("managedFields") or []
        if not entry.get("subresource")
    ]


def foreign_owner(deployment: Mapping[str, Any]) -> str | None:
    """Who owns `deployment` when this pipeline does not, else None.

    Ours: our field manager applied it. A server that keeps no managedFields (the
    simulator) leaves the `app.kubernetes.io/managed-by` label to say so.
    """
    meta = deployment.get("metadata", {})
    label = (meta.get("labels") or {}).get("app.kubernetes.io/managed-by")
    managers = _managers(deployment)
    if not managers:
        return None if label == FIELD_MANAGER else f"label managed-by={label!r}"
    names = {entry.get("manager") for entry in managers}
    if any(e.get("manager") == FIELD_MANAGER and e.get("operation") == "Apply" for e in managers):
        return None
    others = sorted(str(n) for n in names - CONTROLLER_MANAGERS) or sorted(map(str, names))
    return f"field managers {', '.join(others)}" + (
        f", label managed-by={label!r}" if label else ""
    )


def drift(obj: Mapping[str, Any]) -> list[tuple[str, list[str | int]]]:
    """Fields of `obj` that another manager set and our field manager does not own.

    Returns (manager, JSON-pointer tokens into `obj`) pairs, one per foreign-only
    subtree; controllers' own bookkeeping (CONTROLLER_MANAGERS) is no drift.
    """
    ours: dict[str, Any] = {}
    for entry in _managers(obj):
        if entry.get("manager") == FIELD_MANAGER:
            _merge(ours, entry.get("fieldsV1") or {})
    if not ours:
        return []
    found: list[tuple[str, list[str | int]]] = []
    for entry in _managers(obj):
        manager = str(entry.get("manager"))
        if manager == FIELD_MANAGER or manager in CONTROLLER_MANAGERS:
            continue
        found += [(manager, t) for t in _foreign_paths(entry.get("fieldsV1") or {}, ours, obj, [])]
    return found


def _merge(into: dict[str, Any], fields: Mapping[str, Any]) -> None:
    for key, sub in fields.items():
        _merge(into.setdefault(key, {}), sub or {})


def _foreign_paths(
    theirs: Mapping[str, Any], ours: Mapping[str, Any], value: Any, path: list[str | int]
) -> Iterator[list[str | int]]:
    for key, sub in theirs.items():
        if key == ".":
            continue
        token = _locate(key, value)
        if token is None:
            continue  # gone already
        if key not in ours:
            yield [*path, token]
        else:
            yield from _foreign_paths(sub or {}, ours[key], value[token], [*path, token])


def _locate(key: str, value: Any) -> str | int | None:
    """The dict key or list index a fieldsV1 key (f:, k:, v:, i:) names in `value`."""
    kind, _, rest = key.partition(":")
    if kind == "f" and isinstance(value, dict):
        return rest if rest in value else None
    if not isinstance(value, list):
        return None
    if kind == "i":
        return int(rest) if int(rest) < len(value) else None
    wanted = json.loads(rest)
    for index, item in enumerate(value):
        if (kind == "v" and item == wanted) or (
            kind == "k"
            and isinstance(item, dict)
            and all(item.get(k) == v for k, v in wanted.items())
        ):
            return index
    return None


def describe_drift(found: Iterable[tuple[str, list[str | int]]]) -> str:
    """`manager: /a/b, /c` per manager, for messages."""
    by_manager: dict[str, list[str]] = {}
    for manager, tokens in found:
        by_manager.setdefault(manager, []).append(_pointer(tokens))
    return "; ".join(f"{m}: {', '.join(paths)}" for m, paths in sorted(by_manager.items()))


def _pointer(tokens: Iterable[str | int]) -> str:
    return "/" + "/".join(str(t).replace("~", "~0").replace("/", "~1") for t in tokens)


# --------------------------------------------------------------------------- deployer

T = TypeVar("T")


class KubernetesDeployer:
    """The `kubernetes` deploy target: server-side apply of the rendered overlay.

    Health checks use `address()`: cluster DNS inside the cluster, the API server's
    service proxy (on loopback, with the cluster's credentials) outside it.

    `clock` measures rollout deadlines and the API retry budget (monotonic seconds).
    `registries`: logins of the registries images come from (the environment's own);
    an image whose registry has one is pulled with the namespace's pull secret.
    `token_expires_at`: when their login expires (ECR's token), None: static credentials.
    """

    name = "kubernetes"

    def __init__(
        self,
        target: KubernetesTarget | None = None,
        *,
        api_client: Any = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        retry_budget_s: float | None = None,
        registries: Sequence[OciRegistry] = (),
        token_expires_at: datetime | None = None,
    ) -> None:
        self.target = target or KubernetesTarget()
        if retry_budget_s is None:
            retry_budget_s = self.target.api_retry_budget_s
        if retry_budget_s < 0:
            msg = f"retry_budget_s must not be negative, got {retry_budget_s}"
            raise ValueError(msg)
        self.api_client = api_client if api_client is not None else self.target.api_client()
        self._sleep = sleep
        self._clock = clock
        self.retry_budget_s = retry_budget_s
        self.registries = tuple(r for r in registries if r.username and r.password)
        self.token_expires_at = token_expires_at
        self._deployments_dir = (
            Path(self.target.deployments_dir) if self.target.deployments_dir else None
        )

    # -- the Deployer protocol

    def deploy(
        self, env: EnvironmentSpec, service: ServiceSpec, image: ImageRef, *, deadline_s: float
    ) -> DeployedService:
        """Apply `image` for `service` in `env`, wait for the rollout, restore on failure.

        Waits at most the target's `rollout_deadline_s` (the controller's
        ProgressDeadlineExceeded ends a failing rollout sooner); `deadline_s` is the
        other targets' (it must still be positive). A live Deployment this pipeline
        does not own is refused before any write.
        """
        if image.service != service.name:
            msg = f"image {image.reference} is for {image.service!r}, not {service.name!r}"
            raise ValueError(msg)
        if deadline_s <= 0:
            msg = f"deadline_s must be positive, got {deadline_s}"
            raise ValueError(msg)
        objects = self._objects(env, service, image)
        log = run_logger()
        previous = self.live(env, service)
        log.info(
            "%s/%s: applying %s (previous %s)",
            env.name,
            service.name,
            image.reference,
            previous.image.short if previous else "none",
        )
        self._ensure_pull_secret(env, login_for(image, *self.registries), objects)
        try:
            self._apply_and_wait(objects, env, service, image.reference)
        except _ApplyRefused as exc:
            kept = f"still {previous.image.reference}" if previous else "none was there"
            msg = (
                f"{env.name}/{service.name}: applying {image.reference} failed: {exc}; "
                f"removed the objects it created, the Deployment was not changed ({kept})"
            )
            raise DeployError(msg) from exc
        except (RolloutFailed, KubernetesApiError) as exc:
            restored = "removed it (no previous release)"
            try:
                self.restore(env, service, previous)
                if previous is not None:
                    restored = f"restored {previous.image.reference}"
            except DeployError as again:
                restored = f"could NOT restore the previous release: {again}"
            msg = (
                f"{env.name}/{service.name}: rollout of {image.reference} failed: {exc}; {restored}"
            )
            raise DeployError(msg) from exc
        log.info("%s/%s: %s rolled out", env.name, service.name, image.short)
        return DeployedService(
            service=service.name,
            environment=env.name,
            image=image,
            address=self.address(env, service),
            target=self.name,
        )

    def live(self, env: EnvironmentSpec, service: ServiceSpec) -> DeployedService | None:
        """The digest the service's Deployment runs now, or None when it has none.

        Raises:
            DeployError: the Deployment is not this pipeline's (naming its owner), or
                runs an image not pinned by digest.
        """
        deployment = self._read_deployment(env.namespace, service.name)
        if deployment is None:
            return None
        owner = foreign_owner(deployment)
        if owner is not None:
            msg = (
                f"{env.name}/{service.name}: the live Deployment is not this pipeline's "
                f"(owned by {owner}); refusing to take it as the previous release"
            )
            raise DeployError(msg)
        found = self._drift(env, service, deployment)
        if found:
            run_logger().warning(
                "%s/%s: drift, fields other managers set (the next deploy removes them): %s",
                env.name,
                service.name,
                "; ".join(f"{kind}/{service.name}: {describe_drift(f)}" for kind, _, f in found),
            )
        images = [c["image"] for c in containers(deployment) if c.get("name") == APP_CONTAINER] or [
            c["image"] for c in containers(deployment)
        ]
        match = DIGEST_REF.match(images[0]) if images else None
        if match is None:
            msg = (
                f"{env.name}/{service.name}: the live Deployment runs {images}, not an image "
                "pinned by digest; it was not deployed by this pipeline"
            )
            raise DeployError(msg)
        annotations = deployment["metadata"].get("annotations") or {}
        deployed_at = annotations.get(f"{ANNOTATION_PREFIX}deployed-at") or deployment[
            "metadata"
        ].get("creationTimestamp")
        image = ImageRef(
            service=service.name,
            repository=match["repository"],
            digest=match["digest"],
            tag=annotations.get(f"{ANNOTATION_PREFIX}image-tag", ""),
            version=annotations.get(f"{ANNOTATION_PREFIX}version", ""),
            commit=annotations.get(f"{ANNOTATION_PREFIX}commit", ""),
        )
        return DeployedService(
            service=service.name,
            environment=env.name,
            image=image,
            address=self.address(env, service),
            deployed_at=_parse_time(deployed_at),
            target=self.name,
        )

    def restore(
        self, env: EnvironmentSpec, service: ServiceSpec, previous: DeployedService | None
    ) -> None:
        """Re-apply `previous`'s digest and wait; None removes the service's objects."""
        log = run_logger()
        if previous is None:
            log.warning("%s/%s: no previous release, removing it", env.name, service.name)
            self._delete_service(env, service)
            return
        log.warning("%s/%s: restoring %s", env.name, service.name, previous.image.reference)
        objects = self._objects(env, service, previous.image)
        self._ensure_pull_secret(env, login_for(previous.image, *self.registries), objects)
        try:
            self._apply_and_wait(objects, env, service, previous.image.reference)
        except RolloutFailed as exc:
            msg = f"{env.name}/{service.name}: restoring {previous.image.reference} failed: {exc}"
            raise DeployError(msg) from exc

    # -- the canary (tasks/deploy/canary.py)

    def start_canary(
        self, env: EnvironmentSpec, service: ServiceSpec, image: ImageRef, replicas: int
    ) -> None:
        """`image` as the canary Deployment `<service>-canary` beside the stable one
        (which is never written), `replicas` of it Ready on the digest; returns then.

        Raises:
            DeployError: no stable Deployment of this pipeline to run beside.
            RolloutFailed / KubernetesApiError: the canary did not become Ready (the
                caller removes it).
        """
        stable = self.live(env, service)  # refuses a foreign or unpinned Deployment
        if stable is None:
            msg = f"{env.name}/{service.name}: no stable release for a canary to run beside"
            raise DeployError(msg)
        objects = self._objects(env, service, image)
        canary = canary_deployment(objects, service.name, replicas)
        self._ensure_pull_secret(env, login_for(image, *self.registries), objects)
        run_logger().info(
            "%s/%s: canary of %s, %d replica(s), beside %s",
            env.name,
            service.name,
            image.short,
            replicas,
            stable.image.short,
        )
        applied_at = self._clock()
        self._apply_one(canary)
        wanted = (
            canary_name(service.name),
            image.reference,
            replicas,
            progress_deadline_s([canary]),
        )
        self._wait_rolled_out(env, service, wanted, applied_at)

    def remove_canary(self, env: EnvironmentSpec, service: ServiceSpec) -> None:
        """Delete `service`'s canary Deployment (none is fine) and wait for its pods to go,
        so the Service routes to stable alone when this returns."""
        name = canary_name(service.name)
        self._delete(
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name}},
            env.namespace,
        )
        self._wait_pods_gone(env, service, CANARY_TRACK)

    def canaries(self, env: EnvironmentSpec) -> list[str]:
        """The services of `env` whose canary Deployment (this pipeline's) exists."""
        api = self._api("AppsV1Api")
        response = self._call(
            f"list canaries in {env.namespace}",
            api.list_namespaced_deployment,
            env.namespace,
            label_selector=f"{TRACK_LABEL}={CANARY_TRACK}",
            _preload_content=False,
        )
        found = []
        for item in json.loads(response.data).get("items", []):
            service = (item["metadata"].get("labels") or {}).get(NAME_LABEL)
            mine = foreign_owner(item) is None
            if mine and service and item["metadata"]["name"] == canary_name(service):
                found.append(service)
        return sorted(found)

    def address(self, env: EnvironmentSpec, service: ServiceSpec) -> str:
        """Where `service` answers for this process.

        Inside the cluster: cluster DNS. Outside it: the API server's service proxy,
        through a loopback forwarder that adds the cluster's credentials
        (tasks/deploy/service_proxy.py). `KubernetesTarget.health_via` chooses, or
        detects a pod by KUBERNETES_SERVICE_HOST.
        """
        via = self.target.health_via
        if via == "dns" or (via == "auto" and os.environ.get("KUBERNETES_SERVICE_HOST")):
            return f"http://{service.name}.{env.namespace}.svc.cluster.local:{SERVICE_PORT}"
        proxy = service_proxy(self.api_client.configuration, self.target.identity())
        return proxy.url + service_path(env.namespace, service.name, SERVICE_PORT)

    def check(self, namespaces: Iterable[str]) -> str:
        """Try the cluster and credentials before they are saved; the server's version.

        The server must answer with these credentials, and an access review must allow
        them to apply Deployments in each of `namespaces`.

        Raises:
            ConfigError: refused (e.g. 401: a client certificate of another CA), no
                answer, or not allowed to apply in a namespace (named).
        """
        from kubernetes import client  # noqa: PLC0415

        server = self.api_client.configuration.host
        try:
            version = self._call("read the version", client.VersionApi(self.api_client).get_code)
            refused = [ns for ns in namespaces if not self._may_apply(ns)]
        except KubernetesApiError as exc:
            msg = f"the kubeconfig does not work with {server}: {exc}"
            raise ConfigError(msg) from exc
        if refused:
            msg = (
                f"the kubeconfig's credentials may not apply Deployments on {server} in "
                f"namespace(s) {', '.join(refused)} (access review: not allowed)"
            )
            raise ConfigError(msg)
        return str(version.git_version)

    def _may_apply(self, namespace: str) -> bool:
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {
                "resourceAttributes": {
                    "namespace": namespace,
                    "verb": "patch",
                    "group": "apps",
                    "resource": "deployments",
                }
            },
        }
        api = self._api("AuthorizationV1Api")
        response = self._call(
            f"access review in {namespace}",
            api.create_self_subject_access_review,
            review,
            _preload_content=False,
        )
        return bool(json.loads(response.data).get("status", {}).get("allowed"))

    # -- internals

    def _objects(
        self, env: EnvironmentSpec, service: ServiceSpec, image: ImageRef
    ) -> list[dict[str, Any]]:
        rendered = render_overlay(
            env.name, {service.name: image}, deployments_dir=self._deployments_dir
        )
        objects = service_objects(rendered, service.name)
        for obj in objects:
            namespace = obj["metadata"].get("namespace")
            if obj["kind"] == "Namespace":
                namespace = obj["metadata"]["name"]
            if namespace != env.namespace:
                msg = (
                    f"overlays/{env.name} puts {obj['kind']}/{obj['metadata']['name']} in "
                    f"namespace {namespace!r}, the configuration says {env.namespace!r}"
                )
                raise ManifestError(msg)
            if obj["kind"] == "Deployment":
                annotations = obj["metadata"].setdefault("annotations", {})
                annotations[f"{ANNOTATION_PREFIX}deployed-at"] = utcnow().isoformat()
                if login_for(image, *self.registries) is not None:
                    pod = obj["spec"]["template"]["spec"]
                    pod["imagePullSecrets"] = [{"name": PULL_NAME}]
        return objects

    def refresh_pull_credentials(self, env: EnvironmentSpec) -> str | None:
        """Write the namespace's pull secret again if it no longer serves (an ECR token
        written over `TOKEN_MAX_AGE` ago or expiring within `TOKEN_MIN_LEFT`, a changed
        password); returns why it was written, None when it still serves or the
        environment's registry has no login.

        Between deploys nothing else renews it, and a pod rescheduled on another node
        after the token lapsed could not pull its image: the scheduled health check
        calls this (`flows/health.py`).

        Raises:
            DeployError: the Secret cannot be read or written (names no credential).
        """
        own = next((r for r in self.registries if r.password is not None), None)
        return self._ensure_pull_secret(env, own, ())

    def _ensure_pull_secret(
        self,
        env: EnvironmentSpec,
        registry: OciRegistry | None,
        objects: Iterable[Mapping[str, Any]],
    ) -> str | None:
        """Write the namespace's pull secret with `registry`'s login (that of the image's
        registry), unless the live one serves (`pull_secret.stale`); nothing without a
        login. The Namespace among `objects` is applied first: a first release creates
        it. Returns why it was written, None when it was not.

        Raises:
            DeployError: the Secret cannot be read or written (the message names the
                status, never the credentials); nothing was applied.
        """
        if registry is None:
            return None
        api = self._api("CoreV1Api")
        where = f"{env.name}: the pull secret {env.namespace}/{PULL_NAME}"
        try:
            live = self._read_secret(env.namespace)
            now = utcnow()
            reason = stale(live, registry, now, self.token_expires_at)
            if reason is None:
                return None
            for namespace in (o for o in objects if o["kind"] == "Namespace"):
                self._apply_one(namespace)
            self._call(
                f"apply Secret/{PULL_NAME}",
                api.patch_namespaced_secret,
                PULL_NAME,
                env.namespace,
                body=secret_object(env.namespace, registry, now, self.token_expires_at),
                field_manager=FIELD_MANAGER,
                force=True,
                _content_type="application/apply-patch+yaml",
                _preload_content=False,
            )
        except KubernetesApiError as exc:
            logins = [registry.password.get_secret_value() if registry.password else None]
            msg = f"{where} could not be written: {scrub_masked(str(exc), logins)}; nothing applied"
            raise DeployError(msg) from None
        run_logger().info("%s written for %s: %s", where, registry.address, reason)
        return reason

    def _read_secret(self, namespace: str) -> dict[str, Any] | None:
        return self._read_by("CoreV1Api", "namespaced_secret", "Secret", namespace, PULL_NAME)

    def _api(self, name: str) -> Any:
        from kubernetes import client  # noqa: PLC0415

        return getattr(client, name)(self.api_client)

    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call the API, retrying 5xx, 409, 429 and timeouts with exponential backoff.

        Gives up after `target.retries` retries and `retry_budget_s` seconds, both spent.
        """
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415
        from urllib3.exceptions import HTTPError  # noqa: PLC0415

        kwargs.setdefault("_request_timeout", self.target.request_timeout_s)
        delay = self.target.retry_backoff_s
        attempt = 0
        started = self._clock()

        def spent() -> bool:
            return attempt >= self.target.retries and self._clock() - started >= self.retry_budget_s

        while True:
            try:
                return fn(*args, **kwargs)
            except ApiException as exc:
                status = int(exc.status or 0)
                if status not in RETRY_STATUSES or spent():
                    reason = _api_message(exc)
                    msg = f"{what}: the API server answered {status}: {reason}"
                    raise KubernetesApiError(msg, status) from exc
                problem = f"{status} {exc.reason}"
            except (HTTPError, TimeoutError, ConnectionError) as exc:
                if spent():
                    msg = f"{what}: no answer from the API server: {exc}"
                    raise KubernetesApiError(msg) from exc
                problem = type(exc).__name__
            attempt += 1
            run_logger().warning("%s: %s, retry %d in %.2fs", what, problem, attempt, delay)
            self._sleep(delay)
            delay = min(delay * 2, self.target.retry_backoff_max_s)

    def _apply(self, objects: Iterable[Mapping[str, Any]]) -> None:
        """Server-side apply each object in order.

        A failure deletes the objects this apply created (not a Namespace: other
        services may come to live there), then raises; `_ApplyRefused` when the
        Deployment is surely unchanged (refused with a 4xx, or not reached).
        """
        created: list[Mapping[str, Any]] = []
        reached = False
        for obj in objects:
            try:
                if self._apply_one(obj) == 201:
                    created.append(obj)
            except KubernetesApiError as exc:
                self._delete_created(created)
                status = exc.status or 0
                if not reached and (obj["kind"] != "Deployment" or 400 <= status < 500):
                    raise _ApplyRefused(str(exc), exc.status) from exc
                raise
            reached = reached or obj["kind"] == "Deployment"

    def _apply_one(self, obj: Mapping[str, Any]) -> int:
        """Apply `obj`; the HTTP status (201: created)."""
        api_name, suffix, namespaced = _resource(obj)
        meta = obj["metadata"]
        method = getattr(self._api(api_name), f"patch_{suffix}")
        args = (meta["name"], meta["namespace"]) if namespaced else (meta["name"],)
        response = self._call(
            f"apply {obj['kind']}/{meta['name']}",
            method,
            *args,
            body=dict(obj),
            field_manager=FIELD_MANAGER,
            force=True,
            _content_type="application/apply-patch+yaml",
            _preload_content=False,
        )
        return int(response.status)

    def _delete_created(self, created: list[Mapping[str, Any]]) -> None:
        for obj in reversed(created):
            if obj["kind"] != "Namespace":
                run_logger().warning(
                    "removing %s/%s: created by the failed apply",
                    obj["kind"],
                    obj["metadata"]["name"],
                )
                self._delete(obj, obj["metadata"]["namespace"])

    def _delete(self, obj: Mapping[str, Any], namespace: str) -> None:
        """Delete `obj` (in `namespace`); gone already is fine."""
        api_name, suffix, _ = _resource(obj)
        method = getattr(self._api(api_name), f"delete_{suffix}")
        try:
            self._call(
                f"delete {obj['kind']}/{obj['metadata']['name']}",
                method,
                obj["metadata"]["name"],
                namespace,
                _preload_content=False,
            )
        except KubernetesApiError as exc:
            if exc.status != 404:
                raise

    def _drift(
        self, env: EnvironmentSpec, service: ServiceSpec, deployment: Mapping[str, Any] | None
    ) -> list[tuple[str, tuple[str, str], list[tuple[str, list[str | int]]]]]:
        """(kind, resource key, `drift`) of each of the service's DRIFT_KINDS objects
        that has some; `deployment` is the one read already (None: read it)."""
        found = []
        for key in DRIFT_KINDS:
            if key[1] == "Deployment" and deployment is not None:
                obj: Mapping[str, Any] | None = deployment
            else:
                obj = self._read(key, env.namespace, service.name)
            foreign = drift(obj) if obj is not None else []
            if foreign:
                found.append((key[1], key, foreign))
        return found

    def _remove_drift(self, env: EnvironmentSpec, service: ServiceSpec) -> None:
        """Remove what other managers added to the service's objects (see `drift`), one
        JSON patch each. No resourceVersion test: the controllers write the status
        meanwhile, and the paths are into the spec and metadata only we and the drift's
        managers write. The patch is ours (FIELD_MANAGER): a removed field the server
        defaults again (a Service's sessionAffinity) is owned by whoever removed it."""
        for kind, key, found in self._drift(env, service, None):
            run_logger().warning(
                "%s/%s: removing drift from %s: %s",
                env.name,
                service.name,
                kind,
                describe_drift(found),
            )
            paths = sorted((tokens for _, tokens in found), reverse=True)  # later items first
            api_name, suffix, _ = RESOURCES[key]
            self._call(
                f"remove drift from {kind}/{service.name}",
                getattr(self._api(api_name), f"patch_{suffix}"),
                service.name,
                env.namespace,
                body=[{"op": "remove", "path": _pointer(tokens)} for tokens in paths],
                field_manager=FIELD_MANAGER,
                _content_type="application/json-patch+json",
                _preload_content=False,
            )

    def _read(self, key: tuple[str, str], namespace: str, name: str) -> dict[str, Any] | None:
        """The object of kind `key` (RESOURCES) called `name`, or None when there is none."""
        api_name, suffix, _ = RESOURCES[key]
        return self._read_by(api_name, suffix, key[1], namespace, name)

    def _read_by(
        self, api_name: str, suffix: str, kind: str, namespace: str, name: str
    ) -> dict[str, Any] | None:
        try:
            response = self._call(
                f"read {kind} {namespace}/{name}",
                getattr(self._api(api_name), f"read_{suffix}"),
                name,
                namespace,
                _preload_content=False,
            )
        except KubernetesApiError as exc:
            if exc.status == 404:
                return None
            raise
        data: dict[str, Any] = json.loads(response.data)
        return data

    def _read_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._read(("apps/v1", "Deployment"), namespace, name)

    def _pods(self, namespace: str, service: str, track: str = "") -> list[dict[str, Any]]:
        """The pods labelled as `service`'s (of the `track` only, when given)."""
        api = self._api("CoreV1Api")
        only = f",{TRACK_LABEL}={track}" if track else ""
        response = self._call(
            f"list pods of {namespace}/{service}{only}",
            api.list_namespaced_pod,
            namespace,
            label_selector=f"{NAME_LABEL}={service}{only}",
            _preload_content=False,
        )
        items: list[dict[str, Any]] = json.loads(response.data).get("items", [])
        return items

    def _apply_and_wait(
        self,
        objects: list[dict[str, Any]],
        env: EnvironmentSpec,
        service: ServiceSpec,
        image: str,
    ) -> None:
        progress_s = progress_deadline_s(objects)
        minimum = minimum_replicas(objects, service.name)
        applied_at = self._clock()
        self._apply(objects)
        self._remove_drift(env, service)
        self._wait_rolled_out(env, service, (service.name, image, minimum, progress_s), applied_at)

    def _wait_rolled_out(
        self,
        env: EnvironmentSpec,
        service: ServiceSpec,
        wanted: tuple[str, str, int, float],
        applied_at: float,
    ) -> None:
        """Wait for the Deployment `wanted[0]` to run `wanted[1]` on at least `wanted[2]`
        available replicas; `wanted[3]` is its progress deadline (seconds).

        Raises:
            RolloutFailed: new pods cannot start, the controller's deadline passed, or the
                target's `rollout_deadline_s` did.
        """
        name, image, minimum, progress_s = wanted
        give_up_at = applied_at + self.target.rollout_deadline_s
        while True:
            deployment = self._read_deployment(env.namespace, name)
            if deployment is None:
                msg = f"the Deployment {name} disappeared during the rollout"
                raise RolloutFailed(msg)
            now = self._clock()
            status = rollout_status(
                deployment,
                image,
                min_available=minimum,
                deadline_passed=now - applied_at >= progress_s,
            )
            if status.done:
                return
            # Fail fast: a new pod that cannot start fails the deploy now; the deadline
            # only bounds a rollout that is slow but alive.
            stuck = fatal_pod_problems(self._pods(env.namespace, service.name), image)
            if stuck:
                raise RolloutFailed(f"new pods cannot start: {'; '.join(stuck)}")
            if status.failed or now > give_up_at:
                reason = (
                    status.message
                    if status.failed
                    else f"not ready {now - applied_at:.0f}s after the apply ({status.message})"
                )
                pods = pod_problems(self._pods(env.namespace, service.name), image)
                detail = f"; pods: {'; '.join(pods)}" if pods else ""
                raise RolloutFailed(f"{reason}{detail}")
            self._sleep(self.target.poll_interval_s)

    def _wait_pods_gone(self, env: EnvironmentSpec, service: ServiceSpec, track: str = "") -> None:
        """Wait for the service's pods (of `track` only, when given) to finish terminating
        (they do so gracefully)."""
        started = self._clock()
        while True:
            pods = self._pods(env.namespace, service.name, track)
            if not pods:
                return
            grace = max(
                int((p.get("spec") or {}).get("terminationGracePeriodSeconds") or 30) for p in pods
            )
            if self._clock() - started > grace + POD_GONE_GRACE_S:
                names = ", ".join(sorted(p["metadata"]["name"] for p in pods))
                msg = f"{env.name}/{service.name}: pods still terminating: {names}"
                raise DeployError(msg)
            self._sleep(self.target.poll_interval_s)

    def _delete_service(self, env: EnvironmentSpec, service: ServiceSpec) -> None:
        rendered = render_overlay(env.name, deployments_dir=self._deployments_dir)
        mine = [
            o
            for o in rendered
            if (o["metadata"].get("labels") or {}).get(NAME_LABEL) == service.name
        ]
        for obj in reversed(mine):
            self._delete(obj, env.namespace)
        self._wait_pods_gone(env, service)


class _ApplyRefused(KubernetesApiError):
    """An apply failed before it changed the Deployment; what it created is removed."""


def _resource(obj: Mapping[str, Any]) -> tuple[str, str, bool]:
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    if key not in RESOURCES:
        msg = f"cannot apply {key[1]} ({key[0]}): not a kind this deployer manages"
        raise ManifestError(msg)
    return RESOURCES[key]


def _api_message(exc: Any) -> str:
    try:
        return str(json.loads(exc.body).get("message") or exc.reason)
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason)


def _parse_time(value: str | None) -> datetime:
    if not value:
        return utcnow()
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return utcnow()
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)

"""The `kubernetes` deploy target: server-side apply, rollout wait, rollback to the previous digest.

`rollout_status` and `pod_problems` judge plain dicts read from the API server and are
tested without a cluster; `KubernetesDeployer` drives the official client.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from blocks.catalog import ServiceSpec
from blocks.environments import EnvironmentSpec
from blocks.kubernetes_target import KubernetesTarget
from tasks.deploy.manifests import (
    ANNOTATION_PREFIX,
    APP_CONTAINER,
    DIGEST_REF,
    NAME_LABEL,
    SERVICE_PORT,
    containers,
    render_overlay,
    service_objects,
)
from tasks.exceptions import DeployError, KubernetesApiError, ManifestError, RolloutFailed
from tasks.models import DeployedService, ImageRef, utcnow
from tasks.process import run_logger

FIELD_MANAGER = "elice-devops"
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


# --------------------------------------------------------------------------- rollout


@dataclass(frozen=True)
class RolloutStatus:
    """Where a Deployment's rollout stands, as `kubectl rollout status` judges it."""

    done: bool
    failed: bool
    message: str


def rollout_status(deployment: Mapping[str, Any], expected_image: str) -> RolloutStatus:
    """Judge a Deployment read from the API server against the image we applied."""
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
            deadline = spec.get("progressDeadlineSeconds", 600)
            return RolloutStatus(
                False,
                True,
                f"progress deadline ({deadline}s) exceeded: {condition.get('message', '')}",
            )
    wanted = spec.get("replicas", 1)
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


# --------------------------------------------------------------------------- deployer

T = TypeVar("T")


class KubernetesDeployer:
    """The `kubernetes` deploy target: server-side apply of the rendered overlay.

    Health checks against `address()` need cluster DNS: from outside the cluster run
    them through `kubectl port-forward svc/<service> 8000 -n <namespace>`.
    """

    name = "kubernetes"

    def __init__(
        self,
        target: KubernetesTarget | None = None,
        *,
        api_client: Any = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.target = target or KubernetesTarget()
        self.api_client = api_client if api_client is not None else self.target.api_client()
        self._sleep = sleep
        self._deployments_dir = (
            Path(self.target.deployments_dir) if self.target.deployments_dir else None
        )

    # -- the Deployer protocol

    def deploy(
        self, env: EnvironmentSpec, service: ServiceSpec, image: ImageRef, *, deadline_s: float
    ) -> DeployedService:
        """Apply `image` for `service` in `env`, wait for the rollout, restore on failure."""
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
        try:
            self._apply(objects)
            self._wait(env, service, image.reference, deadline_s)
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
        """The digest the service's Deployment runs now, or None when it has none."""
        deployment = self._read_deployment(env.namespace, service.name)
        if deployment is None:
            return None
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
        try:
            self._apply(objects)
            self._wait(env, service, previous.image.reference, self.target.rollout_deadline_s)
        except RolloutFailed as exc:
            msg = f"{env.name}/{service.name}: restoring {previous.image.reference} failed: {exc}"
            raise DeployError(msg) from exc

    def address(self, env: EnvironmentSpec, service: ServiceSpec) -> str:
        """The in-cluster URL of the service (cluster DNS; port-forward from outside)."""
        return f"http://{service.name}.{env.namespace}.svc.cluster.local:{SERVICE_PORT}"

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
        return objects

    def _api(self, name: str) -> Any:
        from kubernetes import client  # noqa: PLC0415

        return getattr(client, name)(self.api_client)

    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call the API, retrying 5xx, 409, 429 and timeouts with exponential backoff."""
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415
        from urllib3.exceptions import HTTPError  # noqa: PLC0415

        kwargs.setdefault("_request_timeout", self.target.request_timeout_s)
        delay = self.target.retry_backoff_s
        attempt = 0
        while True:
            try:
                return fn(*args, **kwargs)
            except ApiException as exc:
                status = int(exc.status or 0)
                if status not in RETRY_STATUSES or attempt >= self.target.retries:
                    reason = _api_message(exc)
                    msg = f"{what}: the API server answered {status}: {reason}"
                    raise KubernetesApiError(msg, status) from exc
                problem = f"{status} {exc.reason}"
            except (HTTPError, TimeoutError, ConnectionError) as exc:
                if attempt >= self.target.retries:
                    msg = f"{what}: no answer from the API server: {exc}"
                    raise KubernetesApiError(msg) from exc
                problem = type(exc).__name__
            attempt += 1
            run_logger().warning(
                "%s: %s, retry %d/%d in %.2fs", what, problem, attempt, self.target.retries, delay
            )
            self._sleep(delay)
            delay = min(delay * 2, self.target.retry_backoff_max_s)

    def _apply(self, objects: Iterable[Mapping[str, Any]]) -> None:
        for obj in objects:
            api_name, suffix, namespaced = _resource(obj)
            meta = obj["metadata"]
            method = getattr(self._api(api_name), f"patch_{suffix}")
            args = (meta["name"], meta["namespace"]) if namespaced else (meta["name"],)
            self._call(
                f"apply {obj['kind']}/{meta['name']}",
                method,
                *args,
                body=dict(obj),
                field_manager=FIELD_MANAGER,
                force=True,
                _content_type="application/apply-patch+yaml",
            )

    def _read_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        api = self._api("AppsV1Api")
        try:
            response = self._call(
                f"read Deployment {namespace}/{name}",
                api.read_namespaced_deployment,
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

    def _pods(self, namespace: str, service: str) -> list[dict[str, Any]]:
        api = self._api("CoreV1Api")
        response = self._call(
            f"list pods of {namespace}/{service}",
            api.list_namespaced_pod,
            namespace,
            label_selector=f"{NAME_LABEL}={service}",
            _preload_content=False,
        )
        items: list[dict[str, Any]] = json.loads(response.data).get("items", [])
        return items

    def _wait(
        self, env: EnvironmentSpec, service: ServiceSpec, image: str, deadline_s: float
    ) -> None:
        started = time.monotonic()
        while True:
            deployment = self._read_deployment(env.namespace, service.name)
            if deployment is None:
                msg = "the Deployment disappeared during the rollout"
                raise RolloutFailed(msg)
            status = rollout_status(deployment, image)
            if status.done:
                return
            timed_out = time.monotonic() - started > deadline_s
            if status.failed or timed_out:
                reason = (
                    status.message
                    if status.failed
                    else f"not ready after {deadline_s:.0f}s ({status.message})"
                )
                pods = pod_problems(self._pods(env.namespace, service.name), image)
                detail = f"; pods: {'; '.join(pods)}" if pods else ""
                raise RolloutFailed(f"{reason}{detail}")
            self._sleep(self.target.poll_interval_s)

    def _delete_service(self, env: EnvironmentSpec, service: ServiceSpec) -> None:
        rendered = render_overlay(env.name, deployments_dir=self._deployments_dir)
        mine = [
            o
            for o in rendered
            if (o["metadata"].get("labels") or {}).get(NAME_LABEL) == service.name
        ]
        for obj in reversed(mine):
            api_name, suffix, _ = _resource(obj)
            method = getattr(self._api(api_name), f"delete_{suffix}")
            try:
                self._call(
                    f"delete {obj['kind']}/{obj['metadata']['name']}",
                    method,
                    obj["metadata"]["name"],
                    env.namespace,
                    _preload_content=False,
                )
            except KubernetesApiError as exc:
                if exc.status != 404:
                    raise


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

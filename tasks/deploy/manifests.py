"""Kubernetes manifests: render the kustomize overlays, pin digests, validate, select.

Pure helpers (`render_overlay`, `pin_images`, `validate_objects`, `service_objects`) work
on plain dicts and are tested without Prefect or a cluster; the deployer in
`tasks.deploy.kubernetes` applies what they produce.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from prefect import task

from blocks.config import repo_root
from core.analysis import CANARY_SUFFIX
from core.errors import ManifestError
from core.records import ImageRef
from tasks.process import run_logger, run_tool, which

# The Kubernetes minor version the manifests are validated against (deployments/README.md).
KUBERNETES_VERSION = "1.31"
APP_CONTAINER = "app"
SERVICE_PORT = 8000
NAME_LABEL = "app.kubernetes.io/name"
ANNOTATION_PREFIX = "elice.io/"
TRACK_LABEL = "track"
CANARY_TRACK = "canary"
DIGEST_REF = re.compile(r"^(?P<repository>[^@\s]+)@(?P<digest>sha256:[0-9a-f]{64})$")
_CHECKOUT_DEPLOYMENTS = Path(__file__).resolve().parents[2] / "deployments"

# Apply order: what others refer to first.
_APPLY_ORDER = (
    "Namespace",
    "ServiceAccount",
    "ConfigMap",
    "PersistentVolumeClaim",
    "Service",
    "Deployment",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
)


# --------------------------------------------------------------------------- rendering


def deployments_root(deployments_dir: Path | None = None) -> Path:
    """The kustomize tree: the argument, else <repo>/deployments, else this checkout's."""
    if deployments_dir is not None:
        return deployments_dir
    candidate = repo_root() / "deployments"
    return candidate if (candidate / "overlays").is_dir() else _CHECKOUT_DEPLOYMENTS


def overlay_names(deployments_dir: Path | None = None) -> list[str]:
    """The environments that have an overlay."""
    overlays = deployments_root(deployments_dir) / "overlays"
    if not overlays.is_dir():
        return []
    return sorted(p.name for p in overlays.iterdir() if (p / "kustomization.yaml").is_file())


def service_kustomization(name: str) -> str:
    """The text of base/services/<name>/kustomization.yaml: the shared template, named."""
    return (
        f"# The shared template (base/service) named {name}; "
        "see tasks.kubernetes.service_kustomization.\n"
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        "components: [../../service]\n"
        "configMapGenerator:\n"
        "  - name: service\n"
        f"    literals: [SERVICE_NAME={name}, OTEL_SERVICE_NAME={name}]\n"
        "    options: {disableNameSuffixHash: true}\n"
    )


def tree_fingerprint(root: Path) -> str:
    """A digest of every file under `root`: changes whenever a manifest does."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=32)
def _kustomize_text(path: Path, fingerprint: str) -> str:  # noqa: ARG001 - the cache key
    done = run_tool([which("kubectl"), "kustomize", str(path)], timeout=120)
    if not done.ok:
        msg = f"kubectl kustomize {path} failed:\n{done.excerpt()}"
        raise ManifestError(msg)
    return done.output


def kustomize(path: Path, *, root: Path | None = None) -> list[dict[str, Any]]:
    """`kubectl kustomize <path>` parsed into objects (cached until a file under `root` changes).

    Raises:
        ManifestError: kustomize failed; the message holds its output.
    """
    fingerprint = tree_fingerprint(root or path)
    return [doc for doc in yaml.safe_load_all(_kustomize_text(path, fingerprint)) if doc]


def image_name(image: str) -> str:
    """The repository part of an image reference, without tag or digest."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name = name[: len(name) - len(last)] + last.split(":", 1)[0]
    return name


def is_pinned(image: str) -> bool:
    """True when `image` is repository@sha256:<64 hex>."""
    return DIGEST_REF.match(image) is not None


def containers(obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _set_env(container: dict[str, Any], values: Mapping[str, str]) -> None:
    env: list[dict[str, Any]] = container.setdefault("env", [])
    for name, value in values.items():
        for item in env:
            if item.get("name") == name:
                item.pop("valueFrom", None)
                item["value"] = value
                break
        else:
            env.append({"name": name, "value": value})


def pin_images(
    objects: Iterable[Mapping[str, Any]], images: Mapping[str, ImageRef]
) -> list[dict[str, Any]]:
    """A copy of `objects` with each given service's image pinned to repository@digest.

    The service's `elice/<service>` placeholder becomes `image.reference`; the
    container's IMAGE_DIGEST, GIT_COMMIT, APP_VERSION and APP_RELEASE are set; the
    Deployment is annotated with tag, version and commit.

    Raises:
        ManifestError: a service has no Deployment, no placeholder container, or
            still runs an unpinned image afterwards.
    """
    result = [copy.deepcopy(dict(obj)) for obj in objects]
    deployments = {o["metadata"]["name"]: o for o in result if o.get("kind") == "Deployment"}
    for service, image in images.items():
        if image.service != service:
            msg = f"images[{service!r}] is an image of {image.service!r}"
            raise ManifestError(msg)
        deployment = deployments.get(service)
        if deployment is None:
            msg = f"no Deployment named {service!r} in the manifests; have {sorted(deployments)}"
            raise ManifestError(msg)
        placeholder = f"elice/{service}"
        targets = [
            c
            for c in containers(deployment)
            if c.get("name") == APP_CONTAINER or image_name(c.get("image", "")) == placeholder
        ]
        if not targets:
            msg = f"{service}: no container {APP_CONTAINER!r} or image {placeholder} to pin"
            raise ManifestError(msg)
        for container in targets:
            container["image"] = image.reference
            _set_env(
                container,
                {
                    "IMAGE_DIGEST": image.digest,
                    "GIT_COMMIT": image.commit or "unknown",
                    "APP_VERSION": image.version or "unknown",
                    "APP_RELEASE": image.tag or image.short,
                },
            )
        annotations = deployment["metadata"].setdefault("annotations", {})
        annotations[f"{ANNOTATION_PREFIX}image-tag"] = image.tag
        annotations[f"{ANNOTATION_PREFIX}version"] = image.version
        annotations[f"{ANNOTATION_PREFIX}commit"] = image.commit
        unpinned = [c["image"] for c in containers(deployment) if not is_pinned(c["image"])]
        if unpinned:
            msg = f"{service}: images not pinned by digest after rendering: {unpinned}"
            raise ManifestError(msg)
    return result


def render_overlay(
    environment: str,
    images: Mapping[str, ImageRef] | None = None,
    *,
    deployments_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Render deployments/overlays/<environment> and pin the given services' images.

    Services not in `images` keep their `elice/<service>` placeholder (fine for
    validation, never applied: the deployer applies only pinned services).

    Raises:
        ValueError: no overlay for `environment`.
        ManifestError: kustomize failed or an image could not be pinned.
    """
    root = deployments_root(deployments_dir)
    known = overlay_names(root)
    if environment not in known:
        msg = f"no overlay for environment {environment!r} under {root}/overlays; have {known}"
        raise ValueError(msg)
    objects = kustomize(root / "overlays" / environment, root=root)
    return pin_images(objects, images or {})


@functools.lru_cache(maxsize=64)
def _schema_validator(kubernetes_version: str, api_version: str, kind: str) -> Any:
    """A strict JSON-schema validator for one kind (kubernetes-validate's bundled schemas).

    Same lookup as `kubernetes_validate.validate`, built once per kind instead of per object.
    """
    import jsonschema  # type: ignore[import-untyped]  # noqa: PLC0415
    import referencing  # noqa: PLC0415
    from kubernetes_validate import utils  # noqa: PLC0415

    wanted = utils.major_minor(kubernetes_version.removeprefix("v"))
    if wanted > utils.latest_version():
        msg = f"no schemas for Kubernetes {kubernetes_version} (newest: {utils.latest_version()})"
        raise ManifestError(msg)
    version = [v for v in utils.all_versions() if utils.major_minor(v) <= wanted][-1]
    folder = f"kubernetes-json-schema/v{version}-local-strict"
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    try:
        schema = utils.schema_contents(f"{folder}/{kind.lower()}-{group}.json", version)
    except FileNotFoundError:
        return None
    definitions = utils.schema_contents(f"{folder}/_definitions.json", version)
    registry = referencing.Resource.from_contents(definitions) @ (
        referencing.Resource.from_contents(schema) @ referencing.Registry()
    )
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def validate_objects(
    objects: Iterable[Mapping[str, Any]], kubernetes_version: str = KUBERNETES_VERSION
) -> list[str]:
    """Strict schema problems of `objects` for `kubernetes_version`; empty when all are valid."""
    problems = []
    for obj in objects:
        meta = obj.get("metadata") or {}
        where = f"{obj.get('kind', '?')}/{meta.get('name', '?')}"
        validator = _schema_validator(
            kubernetes_version, str(obj.get("apiVersion", "")), str(obj.get("kind", ""))
        )
        if validator is None:
            problems.append(
                f"{where}: no schema for {obj.get('apiVersion')} {obj.get('kind')} "
                f"in Kubernetes {kubernetes_version}"
            )
            continue
        for error in sorted(validator.iter_errors(dict(obj)), key=lambda e: list(e.absolute_path)):
            path = ".".join(str(part) for part in error.absolute_path) or "(top level)"
            problems.append(f"{where}: {path}: {error.message}")
    return problems


@task(retries=0)
def validate_manifests(
    environment: str,
    images: Mapping[str, ImageRef] | None = None,
    *,
    kubernetes_version: str = KUBERNETES_VERSION,
    deployments_dir: Path | None = None,
) -> int:
    """Render an environment's overlay and validate it strictly; returns the object count.

    Raises:
        ManifestError: listing every problem found.
    """
    objects = render_overlay(environment, images, deployments_dir=deployments_dir)
    problems = validate_objects(objects, kubernetes_version)
    if problems:
        msg = (
            f"{environment}: {len(problems)} manifest problem(s) for Kubernetes "
            f"{kubernetes_version}:\n  " + "\n  ".join(problems)
        )
        raise ManifestError(msg)
    run_logger().info(
        "%s: %d objects valid for Kubernetes %s", environment, len(objects), kubernetes_version
    )
    return len(objects)


def service_objects(objects: Iterable[Mapping[str, Any]], service: str) -> list[dict[str, Any]]:
    """What a deploy of `service` applies, in apply order.

    The Namespace, the service's labelled objects, and the ConfigMaps its Deployment
    reads (the environment's shared settings).
    """
    every = [dict(o) for o in objects]
    mine = [o for o in every if (o["metadata"].get("labels") or {}).get(NAME_LABEL) == service]
    deployment = next((o for o in mine if o["kind"] == "Deployment"), None)
    if deployment is None:
        msg = f"no Deployment labelled {NAME_LABEL}={service} in the manifests"
        raise ManifestError(msg)
    referenced = {
        source["configMapRef"]["name"]
        for c in containers(deployment)
        for source in c.get("envFrom", [])
        if "configMapRef" in source
    }
    shared = [
        o
        for o in every
        if o["kind"] == "Namespace"
        or (o["kind"] == "ConfigMap" and o["metadata"]["name"] in referenced)
    ]
    chosen = {id(o): o for o in [*shared, *mine]}
    order = {kind: i for i, kind in enumerate(_APPLY_ORDER)}
    return sorted(chosen.values(), key=lambda o: order.get(o["kind"], len(order)))


def canary_name(service: str) -> str:
    """The name of `service`'s canary Deployment."""
    return service + CANARY_SUFFIX


def canary_deployment(
    objects: Iterable[Mapping[str, Any]], service: str, replicas: int
) -> dict[str, Any]:
    """`service`'s rendered Deployment made its canary: named `<service>-canary`, with
    `replicas` of its own, its pods labelled `track: canary` beside every label the
    Service selects (so the one Service routes to stable and canary pods alike).

    `track` joins the canary's selector; stable's selector (immutable) stays as it is:
    the controllers own pods through their ReplicaSets' owner references, so stable never
    adopts the canary's pods.

    Raises:
        ManifestError: `objects` hold no Deployment of `service`.
    """
    deployment = next(
        (
            o
            for o in objects
            if o.get("kind") == "Deployment" and o["metadata"].get("name") == service
        ),
        None,
    )
    if deployment is None:
        msg = f"no Deployment named {service!r} in the manifests to make a canary of"
        raise ManifestError(msg)
    canary = copy.deepcopy(dict(deployment))
    canary["metadata"]["name"] = canary_name(service)
    canary["metadata"].setdefault("labels", {})[TRACK_LABEL] = CANARY_TRACK
    spec = canary["spec"]
    spec["replicas"] = replicas
    spec.setdefault("selector", {}).setdefault("matchLabels", {})[TRACK_LABEL] = CANARY_TRACK
    spec["template"].setdefault("metadata", {}).setdefault("labels", {})[TRACK_LABEL] = CANARY_TRACK
    return canary

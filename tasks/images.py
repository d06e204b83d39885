"""Container images through the Docker Engine API (Docker, or Podman's compatible service).

Build, push (through the engine, the digest read back from the registry) and the
`publish-image` step of CI that finds an image by its version or builds and pushes it.
"""

from __future__ import annotations

import io
import re
import tarfile
import time
import tomllib
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import requests
from docker.utils.build import exclude_paths
from prefect import task
from prefect.tasks import exponential_backoff
from pydantic import BaseModel, ConfigDict, Field

from blocks.catalog import ServiceSpec
from blocks.config import repo_root
from blocks.environments import EnvironmentSpec
from blocks.registry import EcrRegistry, OciRegistry
from blocks.stack import load_stack_info
from core.errors import ConfigError, ImageError, ToolError
from core.records import ImageRef, PromotionPlan, PublishedImage, utcnow
from core.trust import TrustRoots
from tasks.ecr import (
    combine_verdicts,
    ecr_credentials,
    ecr_registry_access,
    ecr_scan_verdict,
    ensure_ecr_repository,
    mirror_to_ecr,
    put_lifecycle_policy,
)
from tasks.engine import docker_error, engine_client, resolve_docker_host
from tasks.masking import mask_value
from tasks.process import retry_on_tool_error, run_logger, tool_slot
from tasks.registry import (
    copy_image,
    find_published_image,
    manifest_digest,
    registry_failure_may_pass,
    registry_refused,
)
from tasks.source import excluded_from_source

DOCKERFILE = "services/Dockerfile"
EXTRA_CA_PATH = ".build/extra-ca.crt"
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
COMMIT_RE = re.compile(r"^[0-9a-f]{7,40}$")
OUTPUT_TAIL = 30


class BuiltImage(BaseModel):
    """An image in the engine's local store, not yet pushed."""

    model_config = ConfigDict(frozen=True)

    service: str
    image_id: str
    repository: str
    tags: tuple[str, ...]
    version: str
    commit: str
    labels: dict[str, str]
    seconds: float

    @property
    def references(self) -> list[str]:
        """repository:tag for every tag."""
        return [f"{self.repository}:{tag}" for tag in self.tags]

    def summary_line(self) -> str:
        """One line for the CI report: built, and (by design) not pushed."""
        return f"built {self.tags[0]} ({self.image_id[:19]}), not pushed: this commit does not ship"

    def report_details(self) -> dict[str, str]:
        """Columns for the CI report."""
        return {"version": self.version, "image_id": self.image_id}


def image_repository(registry: str, namespace: str, service: str) -> str:
    """registry/namespace/service, e.g. 127.0.0.1:5000/elice/course."""
    parts = [registry.rstrip("/"), namespace.strip("/"), service]
    return "/".join(p for p in parts if p)


def image_tags(version: str, commit: str) -> list[str]:
    """The tags of a build: the version and `sha-<12 hex digits of the commit>`.

    Raises:
        ValueError: the version is not a valid tag or the commit is not a hex SHA.
    """
    if not TAG_RE.match(version):
        msg = f"version {version!r} is not a valid image tag ([A-Za-z0-9_.-], max 128)"
        raise ValueError(msg)
    if not COMMIT_RE.match(commit):
        msg = f"commit {commit!r} is not a hex git SHA (7-40 lowercase hex digits)"
        raise ValueError(msg)
    return [version, f"sha-{commit[:12]}"]


def image_labels(
    service: str, version: str, commit: str, *, source: str = "", created: str | None = None
) -> dict[str, str]:
    """OCI annotations (org.opencontainers.image.*) for a service image."""
    labels = {
        "org.opencontainers.image.title": service,
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.revision": commit,
        "org.opencontainers.image.created": created or utcnow().strftime("%Y-%m-%dT%H:%M:%SZ"),
        "io.elice.service": service,
    }
    if source:
        labels["org.opencontainers.image.source"] = source
    return labels


def local_ca_bundle(directory: Path = LOCAL_CA_DIR) -> str | None:
    """The machine's extra CA certificates (update-ca-certificates' local dir), or None."""
    certs = sorted(directory.glob("**/*.crt")) if directory.is_dir() else []
    pems = [p.read_text(encoding="utf-8").strip() for p in certs]
    bundle = "\n".join(pem for pem in pems if "BEGIN CERTIFICATE" in pem)
    return bundle + "\n" if bundle else None


def _ignore_patterns(root: Path) -> list[str]:
    path = root / ".dockerignore"
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def build_context(
    root: Path, service: ServiceSpec, libs: Sequence[str], extra_ca: str | None
) -> io.BytesIO:
    """The build context as a tar: Dockerfile, the service, its libs, the optional CA.

    Raises:
        ValueError: the service or a lib directory does not exist.
    """
    wanted = [service.path, *(f"libs/{lib}" for lib in libs)]
    for path in wanted:
        if not (root / path / "pyproject.toml").is_file():
            msg = f"{root / path}: no pyproject.toml; is {service.name}'s source there?"
            raise ValueError(msg)
    if not (root / DOCKERFILE).is_file():
        msg = f"{root / DOCKERFILE} is missing"
        raise ValueError(msg)
    keep = (DOCKERFILE, *(f"{p}/" for p in wanted))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for rel in sorted(exclude_paths(str(root), _ignore_patterns(root), DOCKERFILE)):
            wanted_file = rel == DOCKERFILE or any(f"{rel}/".startswith(k) for k in keep[1:])
            # what the fingerprint leaves out never enters the image, .dockerignore or not:
            # an image cached by fingerprint must not depend on a checkout's .venv or caches
            if wanted_file and not excluded_from_source(Path(rel)) and (root / rel).is_file():
                tar.add(root / rel, arcname=rel, recursive=False)
        data = (extra_ca or "").encode()
        info = tarfile.TarInfo(EXTRA_CA_PATH)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    return buffer


def _failing_step(lines: list[str]) -> str:
    steps = [line for line in lines if re.search(r"\b(STEP|Step) \d+/\d+", line)]
    return steps[-1].strip() if steps else "(no step reached)"


ENGINE_STORE_RACE = re.compile(
    r"layer not known|image not known|checking if cached image exists from a previous build"
)
"""What Podman (4.3) answers when an image or layer it looked at while building (its build
cache lookup walks every image) was removed at that moment by another client: the build
did not fail on its own account, and the same build again succeeds."""


def _stream_build(chunks: Iterator[dict[str, Any]], service: str) -> str:
    """Consume a build stream; returns the image id.

    Raises:
        ImageError: naming the failing Dockerfile step and the output's tail.
        ToolError: the engine's image store changed under the build (`ENGINE_STORE_RACE`):
            the task builds again.
    """
    lines: list[str] = []
    image_id = ""
    for chunk in chunks:
        if "stream" in chunk:
            lines.extend(ln for ln in str(chunk["stream"]).splitlines() if ln.strip())
        if "aux" in chunk and isinstance(chunk["aux"], dict):
            image_id = str(chunk["aux"].get("ID", image_id))
        if "error" in chunk or "errorDetail" in chunk:
            error = chunk.get("error") or chunk["errorDetail"].get("message", "")
            if ENGINE_STORE_RACE.search(str(error)):
                msg = f"{service}: the engine's image store changed during the build: {error}"
                raise ToolError(msg)
            tail = "\n".join(lines[-OUTPUT_TAIL:])
            msg = f"{service}: image build failed at {_failing_step(lines)}: {error}\n{tail}"
            raise ImageError(msg)
    if not image_id:
        found = [line for line in lines if re.match(r"^(Successfully built |[0-9a-f]{64}$)", line)]
        image_id = found[-1].split()[-1] if found else ""
    if not image_id:
        msg = f"{service}: the engine reported no image id:\n" + "\n".join(lines[-OUTPUT_TAIL:])
        raise ImageError(msg)
    return image_id


def _build_args(service: ServiceSpec, libs: list[str], base_image: str | None) -> dict[str, str]:
    """The Dockerfile's build arguments for `service`."""
    buildargs = {"SERVICE": service.name, "PACKAGE": service.package, "LIBS": " ".join(libs)}
    if base_image:
        buildargs["BASE_IMAGE"] = base_image
    return buildargs


def _engine_build(client: Any, context: Any, service: str, build: dict[str, Any]) -> str:
    """Build through the engine's API (the shared Dockerfile, host network); the image id."""
    stream = client.api.build(
        fileobj=context,
        custom_context=True,
        dockerfile=DOCKERFILE,
        network_mode="host",
        rm=True,
        forcerm=True,
        decode=True,
        **build,
    )
    return _stream_build(stream, service)


@task(
    task_run_name="build_image-{service.name}",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=retry_on_tool_error,
)
def build_image(
    service: ServiceSpec,
    *,
    docker_host: str,
    repository: str,
    version: str,
    commit: str,
    base_image: str | None = None,
    libs: Sequence[str] | None = None,
    source: str = "",
    extra_ca: str | None = None,
    root: Path | None = None,
) -> BuiltImage:
    """Build a service image with the shared Dockerfile; tag it with version and commit.

    Args:
        repository: where the image will live, from `image_repository()`.
        base_image: BASE_IMAGE build argument (None: the Dockerfile's default).
        libs: dirs under libs/ to install (default: the service's libs).
        extra_ca: PEM bundle trusted by the builder stage only (`local_ca_bundle()`).
        root: the monorepo (default `repo_root()`).

    Raises:
        ValueError: bad version, commit or paths (before any build).
        ImageError: the build failed; names the step and shows the output's tail.
        ToolError: the engine is unreachable.
    """
    tags = image_tags(version, commit)
    chosen_libs = list(service.libs if libs is None else libs)
    context = build_context(root or repo_root(), service, chosen_libs, extra_ca)
    labels = image_labels(service.name, version, commit, source=source)
    buildargs = _build_args(service, chosen_libs, base_image)
    client = engine_client(docker_host)
    try:
        with tool_slot():  # the engine's build works like a tool process: one slot
            started = time.monotonic()
            build = {"tag": f"{repository}:{tags[0]}", "buildargs": buildargs, "labels": labels}
            image_id = _engine_build(client, context, service.name, build)
        for tag in tags[1:]:
            client.api.tag(image_id, repository, tag)
    except docker_error("APIError") as exc:
        msg = f"{service.name}: engine refused the build: {getattr(exc, 'explanation', '') or exc}"
        raise ImageError(msg) from exc
    except docker_error("DockerException") as exc:
        msg = f"{service.name}: engine connection failed during build: {exc}"
        raise ToolError(msg) from exc
    finally:
        client.close()
    seconds = time.monotonic() - started
    run_logger().info("built %s:%s (%s) in %.1fs", repository, tags[0], image_id[:19], seconds)
    return BuiltImage(
        service=service.name,
        image_id=image_id,
        repository=repository,
        tags=tuple(tags),
        version=version,
        commit=commit,
        labels=labels,
        seconds=seconds,
    )


@task(
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_on_tool_error,
)
def push_image(
    image: BuiltImage, *, docker_host: str, registry: OciRegistry | None = None
) -> ImageRef:
    """Push every tag of `image` through the engine; read the digest back from the registry.

    The engine reports the registry's answer in the push's stream: a blip there (5xx,
    429, a refused or reset connection, a cut answer, a timeout) is a `ToolError` this
    task retries, like an engine that fails or drops the connection; a refusal (401/403,
    ...) is final. One classification with skopeo's copies (`registry_failure_may_pass`).

    Raises:
        ToolError: engine or registry unreachable or failing for now (retried).
        ImageError: the registry refused the push, or tags disagree on the digest.
    """
    auth = None
    if registry and registry.username and registry.password:
        auth = {
            "username": registry.username.get_secret_value(),
            "password": mask_value(registry.password.get_secret_value()),
        }
    client = engine_client(docker_host)
    try:
        for tag in image.tags:
            for chunk in client.api.push(
                image.repository, tag=tag, stream=True, decode=True, auth_config=auth
            ):
                if "error" in chunk:
                    error = str(chunk["error"])
                    kind = ToolError if registry_failure_may_pass(error) else ImageError
                    msg = f"{image.repository}:{tag}: push failed: {error}"
                    raise kind(msg)
    except docker_error("DockerException") as exc:
        kind = ImageError if registry_refused(str(exc)) else ToolError
        msg = f"{image.repository}: push failed in the engine: {exc}"
        raise kind(msg) from exc
    except (requests.RequestException, OSError) as exc:
        # docker-py converts only HTTP errors: an engine that drops the connection
        # mid-push reaches here as requests' (or the socket's) own error.
        msg = f"{image.repository}: the engine dropped the push: {type(exc).__name__}: {exc}"
        raise ToolError(msg) from exc
    finally:
        client.close()
    digests = {manifest_digest(image.repository, tag, registry) for tag in image.tags}
    if len(digests) != 1:
        msg = f"{image.repository}: tags {image.tags} point at different digests {digests}"
        raise ImageError(msg)
    digest = digests.pop()
    run_logger().info("pushed %s@%s", image.repository, digest)
    return ImageRef(
        service=image.service,
        repository=image.repository,
        digest=digest,
        tag=image.tags[0],
        version=image.version,
        commit=image.commit,
    )


# --- delivery: the image a service ships as ------------------------------------------

REGISTRY_BLOCK = "elice-registry"
ECR_BLOCK = "elice-ecr"


def pipeline_registry(roots: TrustRoots | None) -> OciRegistry:
    """The CI registry: the saved `elice-registry` block, else the local stack's.

    With trust roots (a worker), the block's address must be the one they pin for it.

    Raises:
        ConfigError: no block is saved and no local stack runs; the block is not pinned.
    """
    try:
        block = cast("OciRegistry", OciRegistry.load(REGISTRY_BLOCK))
    except ValueError as exc:
        stack = load_stack_info()
        if stack is None:
            msg = f"no registry: save an OciRegistry block {REGISTRY_BLOCK!r} or `cicd stack up`"
            raise ConfigError(msg) from exc
        return OciRegistry(address=stack.registry, insecure=True)
    if roots is not None:
        roots.check_registry(REGISTRY_BLOCK, block.address)
    return block


class EnvironmentRegistry(BaseModel):
    """The registry an environment's images live in, with a login for this run."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    access: OciRegistry
    ecr: EcrRegistry | None = None
    expires_at: datetime | None = Field(
        default=None, description="When the login expires (ECR's token); None: static"
    )

    def repository(self, service: str) -> str:
        """address/namespace/service."""
        return self.access.repository(service)


def environment_registry(env: EnvironmentSpec, roots: TrustRoots | None) -> EnvironmentRegistry:
    """`env`'s own registry (the block its configuration names), else the CI registry.

    An ECR registry's login comes from GetAuthorizationToken, refreshed before it expires.
    With trust roots (a worker), the registry's address must be the one they pin for the
    block: a block rewritten through the API breaks the run, never moves the images.

    Raises:
        ConfigError: the named block is not saved (or is not of the named kind), or its
            address is not the pinned one.
        ToolError: ECR's API refused or is unreachable.
    """
    choice = env.registry
    if choice is None:
        return EnvironmentRegistry(access=pipeline_registry(roots))
    kind = EcrRegistry if choice.kind == "ecr" else OciRegistry
    try:
        block = kind.load(choice.block)
    except ValueError as exc:
        msg = (
            f"{env.name}: its registry block {choice.block!r} ({choice.kind}) is not saved; "
            f"save a {kind.__name__} block of that name (`cicd setup` lists them)"
        )
        raise ConfigError(msg) from exc
    if isinstance(block, EcrRegistry):
        access = ecr_registry_access(block)
        expires_at = ecr_credentials(block).expires_at  # the login just used (cached)
        chosen = EnvironmentRegistry(access=access, ecr=block, expires_at=expires_at)
    else:
        chosen = EnvironmentRegistry(access=cast("OciRegistry", block))
    if roots is not None:
        roots.check_registry(choice.block, chosen.access.address)
    return chosen


def login_for(image: ImageRef, *registries: OciRegistry) -> OciRegistry | None:
    """The registry block among `registries` that serves `image`'s host, if any."""
    host = image.repository.split("/", 1)[0]
    return next((r for r in registries if r.address == host), None)


def place_images(
    plan: PromotionPlan, source: EnvironmentRegistry, target: EnvironmentRegistry
) -> PromotionPlan:
    """`plan` with each image in `target`'s registry, copied there by digest if it is not.

    The copies run in parallel; each digest is read back from the target before the plan
    names it, so what deploys is byte for byte what the source environment verified.
    An image already in the target's repository is not copied.

    Raises:
        RegistryError: a registry refused a login or the image, or a digest changed.
        ToolError: a registry is unreachable (after retries).
    """
    moving = [c for c in plan.changes if c.image.repository != target.repository(c.service)]
    if not moving:
        return plan
    if target.ecr is not None:  # ECR makes no repository on push; its API records the tag
        for change in moving:
            ensure_ecr_repository(target.ecr, change.service)
        futures = {
            c.service: mirror_to_ecr.submit(
                c.image, target.ecr, source=login_for(c.image, source.access)
            )
            for c in moving
        }
    else:
        futures = {
            c.service: copy_image.submit(
                c.image, target.access, source=login_for(c.image, source.access)
            )
            for c in moving
        }
    placed = {service: future.result() for service, future in futures.items()}
    changes = [
        c.model_copy(update={"image": placed[c.service]}) if c.service in placed else c
        for c in plan.changes
    ]
    return plan.model_copy(update={"changes": changes})


def with_ecr_scans(plan: PromotionPlan, ecr: EcrRegistry) -> PromotionPlan:
    """`plan` with each release's scan combined with ECR's scan-on-push verdict.

    Any "vulnerable" wins; "clean" only when both scans are clean: an image ECR has not
    scanned stays "unknown", never "clean".
    """
    futures = {c.service: ecr_scan_verdict.submit(ecr, c.image) for c in plan.changes}
    changes = []
    for change in plan.changes:
        verdict, _ = futures[change.service].result()
        combined = combine_verdicts(change.scan, verdict)
        changes.append(change.model_copy(update={"scan": combined}))
    return plan.model_copy(update={"changes": changes})


class DeliverySettings(BaseModel):
    """Where images are built, pushed and deployed."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    docker_host: str = Field(description="Docker API engine that builds the images")
    registry: OciRegistry = Field(description="The registry images are pushed to")
    base_image: str | None = Field(default=None, description="BASE_IMAGE build argument")
    ecr: EcrRegistry | None = Field(default=None, description="ECR mirror, when configured")


def delivery_settings(
    docker_host: str | None, env: EnvironmentSpec | None, roots: TrustRoots | None
) -> DeliverySettings:
    """Where images are built and pushed, resolved once per CI run.

    The engine: `docker_host` (the user setting DOCKER_HOST), else the local stack's. The registry:
    `env`'s own (CI's deploy environment), else the saved `elice-registry` block, else
    the local stack's. The base image: the local stack's (None: the Dockerfile's
    default). ECR mirror: the saved `elice-ecr` block, if any. With trust roots (a
    worker), every registry block's address must be the one they pin for it.

    Raises:
        ConfigError: no registry is configured and no local stack runs.
        ToolError: no engine is configured and no local stack runs.
    """
    engine = resolve_docker_host(docker_host)
    stack = load_stack_info()
    if env is not None:
        registry = environment_registry(env, roots).access
    else:
        registry = pipeline_registry(roots)
    try:
        ecr: EcrRegistry | None = cast("EcrRegistry", EcrRegistry.load(ECR_BLOCK))
    except ValueError:  # no ECR block saved: no mirror
        ecr = None
    if ecr is not None and roots is not None:
        roots.check_registry(ECR_BLOCK, ecr_registry_access(ecr).address)
    return DeliverySettings(
        docker_host=engine,
        registry=registry,
        base_image=stack.base_image if stack else None,
        ecr=ecr,
    )


def image_version(repo: str | Path, service: ServiceSpec, fingerprint: str) -> str:
    """The image version: the service's package version plus its source fingerprint.

    Equal fingerprints give equal versions, so an unchanged service finds its image.
    """
    project = tomllib.loads((Path(repo) / service.path / "pyproject.toml").read_text("utf-8"))
    version = str(project.get("project", {}).get("version", "0.0.0"))
    return f"{version}-{fingerprint[:12]}"


def build_arguments(
    service: ServiceSpec, repo: str, version: str, commit: str, settings: DeliverySettings
) -> dict[str, Any]:
    """`build_image`'s keyword arguments for `service` in the checkout `repo`."""
    return {
        "docker_host": settings.docker_host,
        "repository": settings.registry.repository(service.name),
        "version": version,
        "commit": commit,
        "base_image": settings.base_image,
        "extra_ca": local_ca_bundle(),
        "root": Path(repo),
    }


@task(task_run_name="publish_image-{service.name}")
def publish_image(
    service: ServiceSpec,
    repo: str,
    version: str,
    commit: str,
    settings: DeliverySettings,
    *,
    rebuild: bool = False,
) -> PublishedImage:
    """The service's image in the registry: found by its version, else built and pushed.

    With an ECR block configured, the image is mirrored into ECR by digest as well.
    """
    found = None if rebuild else find_published_image(service, version, commit, settings.registry)
    if found is not None:
        return PublishedImage(image=found, reused=True)
    built = build_image(service, **build_arguments(service, repo, version, commit, settings))
    image = push_image(built, docker_host=settings.docker_host, registry=settings.registry)
    if settings.ecr is not None:
        ensure_ecr_repository(settings.ecr, service.name)
        put_lifecycle_policy(settings.ecr, service.name)
        mirror_to_ecr(image, settings.ecr, settings.registry)
    return PublishedImage(image=image, reused=False)

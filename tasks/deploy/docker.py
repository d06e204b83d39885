"""The `docker` deploy target: one container per (environment, service) on the Docker API."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import docker
import requests

from blocks.catalog import ServiceSpec
from blocks.docker_target import DockerTarget
from blocks.environments import EnvironmentSpec
from blocks.registry import OciRegistry
from core.analysis import GREEN_SUFFIX
from core.catalog import local_address
from core.errors import DeployError, RegistryError, ToolError
from core.records import DeployedService, HealthResult, ImageRef, utcnow
from tasks.engine import docker_error, engine_client, resolve_docker_host
from tasks.health import probe_health
from tasks.masking import mask_value
from tasks.process import run_logger
from tasks.registry import fetch_manifest

LABEL = "io.elice."
MANAGED_BY = "elice-devops"
LOG_LINES = 8
LOG_LINE_CHARS = 300
STOP_TIMEOUT_S = 10


def container_name(prefix: str, env: str, service: str) -> str:
    """The canonical container name of `service` in `env`."""
    return f"{prefix}-{env}-{service}"


def log_excerpt(text: str, lines: int = LOG_LINES) -> str:
    """The first and last `lines` lines (start-up errors, then the end), each line capped."""
    all_lines = [line[:LOG_LINE_CHARS] for line in text.strip().splitlines()]
    if len(all_lines) > 2 * lines:
        all_lines = [*all_lines[:lines], "...", *all_lines[-lines:]]
    return "\n".join(all_lines)


def container_env(
    env: EnvironmentSpec, service: ServiceSpec, image: ImageRef, extra: Mapping[str, str]
) -> dict[str, str]:
    """The variables a service container runs with; `extra` comes last and wins."""
    return {
        "PORT": str(env.host_port(service.port)),
        "HOST": "127.0.0.1",
        "LOG_LEVEL": env.log_level,
        "ENVIRONMENT": env.name,
        "APP_VERSION": image.version,
        "APP_RELEASE": image.tag,
        "IMAGE_DIGEST": image.digest,
        "GIT_COMMIT": image.commit,
        **extra,
    }


def container_labels(
    env: EnvironmentSpec, image: ImageRef, deployed_at: datetime
) -> dict[str, str]:
    """Labels that let `live()` rebuild the DeployedService from the container alone."""
    fields = {
        "managed-by": MANAGED_BY,
        "environment": env.name,
        "service": image.service,
        "repository": image.repository,
        "digest": image.digest,
        "tag": image.tag,
        "version": image.version,
        "commit": image.commit,
        "deployed-at": deployed_at.isoformat(),
    }
    return {LABEL + key: value for key, value in fields.items()}


def deployed_from_labels(labels: Mapping[str, str], address: str) -> DeployedService:
    """The DeployedService recorded in a container's labels.

    Raises:
        ValueError: the labels are not those of an elice-devops container.
    """
    if labels.get(LABEL + "managed-by") != MANAGED_BY:
        msg = f"container labels lack {LABEL}managed-by={MANAGED_BY}"
        raise ValueError(msg)
    value = {k.removeprefix(LABEL): v for k, v in labels.items() if k.startswith(LABEL)}
    image = ImageRef(
        service=value["service"],
        repository=value["repository"],
        digest=value["digest"],
        tag=value.get("tag", ""),
        version=value.get("version", ""),
        commit=value.get("commit", ""),
    )
    return DeployedService(
        service=image.service,
        environment=value["environment"],
        image=image,
        address=address,
        deployed_at=datetime.fromisoformat(value["deployed-at"]),
        target="docker",
    )


@contextmanager
def _engine_errors(action: str) -> Iterator[None]:
    try:
        yield
    except docker_error("DockerException") as exc:
        msg = f"Docker engine failed to {action}: {exc}"
        raise ToolError(msg) from exc
    except (requests.RequestException, OSError) as exc:
        # docker-py converts only HTTP errors: a dropped connection or a read timeout
        # reaches here as requests' (or the socket's) own error.
        msg = f"Docker engine unreachable while trying to {action}: {type(exc).__name__}: {exc}"
        raise ToolError(msg) from exc


# Podman's Docker API answers 500 for these while a container's files are still in use
# (a stop or remove racing its cleanup under load); the same call a moment later works.
_TRANSIENT_ENGINE = ("device or resource busy", "timed out waiting for file")
_VANISHED = "no such container"
ENGINE_ATTEMPTS = 4
WATCH_SLICE_S = 1.0  # how often a deploy looks at the new container between probes
LAST_WORDS_S = 10.0  # how long a failed release still running may take to say why


def _last_words(container: Any) -> str:
    """The excerpt of a failed release's log, once it has said what it had to say.

    A release that failed its health check may still be starting (a deadline ran out
    before it printed why it will not start, on busy cores), and the engine may hand out
    an exited container's log a moment late: removing it at once lost a reason printed to
    stderr ("logs: (none)"). So, while its log is empty: up to LAST_WORDS_S for it to end
    on its own, then stopped (its output flushed), then its log read again, a few times.
    """
    text = container.logs(tail=500).decode("utf-8", "replace")
    if not text.strip():
        with contextlib.suppress(Exception):  # the engine's wait timed out: it still runs
            container.wait(timeout=LAST_WORDS_S)
        container.reload()
        if container.status == "running":
            _settled(lambda: container.stop(timeout=STOP_TIMEOUT_S))
    for attempt in range(4):
        if text.strip():
            break
        time.sleep(0.5 * attempt)
        text = container.logs(tail=500).decode("utf-8", "replace")
    return log_excerpt(text)


def _settled(call: Callable[[], Any]) -> Any:
    """`call()`, repeated (1, 2, 3 s apart) while the engine reports a transient 500."""
    for attempt in range(1, ENGINE_ATTEMPTS + 1):
        try:
            return call()
        except docker_error("APIError") as exc:
            transient = any(text in str(exc) for text in _TRANSIENT_ENGINE)
            if not transient or attempt == ENGINE_ATTEMPTS:
                raise
            run_logger().warning("engine busy (%s); again in %d s", exc, attempt)
            time.sleep(attempt)
    return None  # unreachable: the last attempt returns or raises


def _remove_container(container: Any) -> None:
    """Remove `container`; one already gone (a retried remove that had worked) is fine."""
    try:
        _settled(lambda: container.remove(force=True))
    except docker_error("NotFound"):
        pass


class DockerDeployer:
    """Deploys services as host-network containers, blue/green by stop-start-verify.

    `extra_env` maps an image digest to variables added to that release's containers
    only: the drill hook (e.g. `FAULT_HEALTH=1`) for deploying a deliberately broken
    release of a real image. `environment_env` adds variables to every container of an
    environment, by environment name. `health_deadline_s` bounds `restore()` and the
    wait for a previous release brought back after a failed deploy.
    Engine failures (API errors, engine down) raise ToolError.
    """

    name = "docker"

    def __init__(
        self,
        docker_host: str | None = None,
        prefix: str = "elice",
        extra_env: Mapping[str, Mapping[str, str]] | None = None,
        *,
        environment_env: Mapping[str, Mapping[str, str]] | None = None,
        health_deadline_s: float = 60.0,
        registries: Sequence[OciRegistry] = (),
    ) -> None:
        self.docker_host = docker_host
        self.registries = {r.address: r for r in registries}
        self.prefix = prefix
        self.extra_env = {k: dict(v) for k, v in (extra_env or {}).items()}
        self.environment_env = {k: dict(v) for k, v in (environment_env or {}).items()}
        self.health_deadline_s = health_deadline_s
        self._client: docker.DockerClient | None = None

    @classmethod
    def from_block(
        cls,
        target: DockerTarget,
        extra_env: Mapping[str, Mapping[str, str]] | None = None,
        registries: Sequence[OciRegistry] = (),
    ) -> DockerDeployer:
        """A deployer configured by a DockerTarget block; `registries` log in to pull."""
        return cls(
            target.docker_host,
            target.name_prefix,
            extra_env,
            environment_env=target.environment_env,
            health_deadline_s=target.health_deadline_s,
            registries=registries,
        )

    @property
    def client(self) -> docker.DockerClient:
        """The engine client, connected on first use.

        Raises:
            ToolError: the engine does not answer.
        """
        if self._client is None:
            client = engine_client(resolve_docker_host(self.docker_host), timeout=120)
            self._client = client
        return self._client

    def address(self, env: EnvironmentSpec, service: ServiceSpec) -> str:
        """http://127.0.0.1:<host port> (`core.catalog.local_address`, shared with status)."""
        return local_address(env, service)

    def refresh_pull_credentials(self, env: EnvironmentSpec) -> str | None:  # noqa: ARG002
        """None: the engine pulls with the registry's login given at each deploy; the
        environment keeps no credentials that could lapse."""
        return None

    def _find(self, name: str) -> Any | None:
        try:
            return self.client.containers.get(name)
        except docker_error("NotFound"):
            return None
        except docker_error("APIError") as exc:
            # Podman resolves the name first and then reads the container by id; one
            # removed in between answers 500 "no such container": it is gone, as a 404.
            if _VANISHED in str(exc):
                return None
            raise

    def live(self, env: EnvironmentSpec, service: ServiceSpec) -> DeployedService | None:
        """What the running canonical container serves, from its labels; None if none runs."""
        name = container_name(self.prefix, env.name, service.name)
        with _engine_errors(f"inspect {name}"):
            container = self._find(name)
        if container is None or container.status != "running":
            return None
        return deployed_from_labels(container.labels, self.address(env, service))

    def _remove(self, name: str) -> None:
        container = self._find(name)
        if container is not None:
            _remove_container(container)

    def _registry_of(self, image: ImageRef) -> OciRegistry | None:
        """The block (its login) of the registry `image` lives in, if one was given."""
        return self.registries.get(image.repository.split("/", 1)[0])

    def _pull_with_login(self, image: ImageRef) -> None:
        """Pull `image` by digest with its registry's login, when that registry has one.

        The engine's implicit pull (on run) is anonymous; a registry that needs a login
        gets the credentials of its block, handed to the engine for this pull only.
        """
        registry = self._registry_of(image)
        if registry is None or registry.username is None or registry.password is None:
            return
        login = {
            "username": registry.username.get_secret_value(),
            "password": mask_value(registry.password.get_secret_value()),
        }
        self.client.images.pull(image.repository, tag=image.digest, auth_config=login)

    def _local_copy(self, image: ImageRef) -> str | None:
        """The engine's own image of `image`, by id, when it has it; else None.

        An engine that built and pushed an image does not know it by the registry's
        manifest digest (Podman re-encodes layers on push), so running `repo@digest`
        pulls every layer back and unpacks it again. The registry's manifest of
        `image.digest`, checked against that digest here, names its config's digest,
        which is the image id: the config pins the layers' uncompressed digests, so
        the engine's image with that id is the same filesystem and configuration. Any
        doubt (no manifest, an index, a body that does not hash to the digest, no such
        image here) answers None and the engine pulls by digest as before.
        """
        registry = self._registry_of(image)
        try:
            answer = fetch_manifest(image.repository, image.digest, registry)
        except (RegistryError, ToolError):
            return None
        if "sha256:" + hashlib.sha256(answer.content).hexdigest() != image.digest:
            return None
        try:
            manifest = answer.json()
        except ValueError:
            return None
        config = manifest.get("config") if isinstance(manifest, dict) else None
        digest = config.get("digest") if isinstance(config, dict) else None
        if not isinstance(digest, str) or not digest.startswith("sha256:"):
            return None
        try:
            local = self.client.images.get(digest)
        except docker_error("ImageNotFound"):
            return None
        return digest if local.id == digest else None

    def _start(self, env: EnvironmentSpec, service: ServiceSpec, image: ImageRef, name: str) -> Any:
        extra = {**self.environment_env.get(env.name, {}), **self.extra_env.get(image.digest, {})}
        try:
            local = self._local_copy(image)
            if local is None:
                self._pull_with_login(image)
            return self.client.containers.run(
                local or image.reference,
                name=name,
                detach=True,
                network_mode="host",
                environment=container_env(env, service, image, extra),
                labels=container_labels(env, image, utcnow()),
            )
        except docker_error("ImageNotFound"):
            msg = f"image {image.reference} not found in the registry or the engine"
        except docker_error("APIError") as exc:
            msg = f"cannot start {image.reference}: {getattr(exc, 'explanation', exc)}"
        raise DeployError(f"{service.name} {image.short} in {env.name}: {msg}")

    def _probe(
        self, env: EnvironmentSpec, service: ServiceSpec, digest: str, deadline_s: float
    ) -> HealthResult:
        return probe_health(
            self.address(env, service), service, deadline_s=deadline_s, expect_digest=digest
        )

    def _watch(
        self, new: Any, env: EnvironmentSpec, service: ServiceSpec, digest: str, deadline_s: float
    ) -> HealthResult:
        """Probe the new container until healthy; fail at once when it has exited or is
        restarting (fail fast): the deadline only bounds a release that is slow but alive.
        """
        end = time.monotonic() + deadline_s
        while True:
            remaining = end - time.monotonic()
            result = self._probe(env, service, digest, max(min(WATCH_SLICE_S, remaining), 0.1))
            if result.ok or remaining <= WATCH_SLICE_S:
                return result
            new.reload()
            state = new.attrs.get("State") or {}
            if new.status in ("exited", "dead") or state.get("Restarting"):
                code = state.get("ExitCode")
                stopped = f"the container {new.status} (exit code {code}) before it was healthy"
                return result.model_copy(update={"failures": [*result.failures, stopped]})

    def _bring_back(self, env: EnvironmentSpec, service: ServiceSpec, old: Any | None) -> str:
        """Restart the previous container stopped by this deploy; say how that went."""
        if old is None:
            return "no previous release to restore"
        previous = deployed_from_labels(old.labels, self.address(env, service)).image
        old.start()
        back = self._probe(env, service, previous.digest, self.health_deadline_s)
        if back.ok:
            return f"previous release {previous.short} restored"
        return f"previous release {previous.short} did not come back: {'; '.join(back.failures)}"

    def deploy(
        self, env: EnvironmentSpec, service: ServiceSpec, image: ImageRef, *, deadline_s: float
    ) -> DeployedService:
        """Stop the old container, start `image`, keep it if healthy, else restart the old one.

        Raises:
            ValueError: `image` is not an image of `service`, or a bad deadline.
            DeployError: `image` did not become healthy; the previous release was restarted.
        """
        if image.service != service.name:
            msg = f"image {image.reference} is of service {image.service!r}, not {service.name!r}"
            raise ValueError(msg)
        if deadline_s <= 0:
            msg = f"deadline_s must be positive, got {deadline_s}"
            raise ValueError(msg)
        with _engine_errors(f"deploy {image.reference} to {env.name}"):
            return self._deploy(env, service, image, deadline_s)

    def _deploy(
        self, env: EnvironmentSpec, service: ServiceSpec, image: ImageRef, deadline_s: float
    ) -> DeployedService:
        name = container_name(self.prefix, env.name, service.name)
        self._remove(f"{name}-next")
        old = self._find(name)
        serving = old if old is not None and old.status == "running" else None
        if serving is not None:
            _settled(lambda: serving.stop(timeout=STOP_TIMEOUT_S))
        try:
            return self._replace(env, service, image, deadline_s, old, serving)
        except DeployError:
            raise
        except Exception as exc:
            # The engine failed between stopping the old container and proving the new one
            # (a dropped connection, a timeout, a 500): the old one is started again.
            outcome = self._bring_back_after(env, service, serving, f"{name}-next")
            msg = f"{service.name}: deploying {image.short} to {env.name} failed: {exc}; {outcome}"
            raise ToolError(msg) from exc

    def _bring_back_after(
        self, env: EnvironmentSpec, service: ServiceSpec, old: Any | None, spare: str
    ) -> str:
        """`_bring_back` after an engine failure: the half-started spare removed first; any
        error of the engine's is reported, never raised over the failure it follows."""
        try:
            self._remove(spare)
            return self._bring_back(env, service, old)
        except Exception as exc:  # noqa: BLE001 - reported with the deploy's own failure
            return f"the previous release could NOT be restarted: {type(exc).__name__}: {exc}"

    def _replace(
        self,
        env: EnvironmentSpec,
        service: ServiceSpec,
        image: ImageRef,
        deadline_s: float,
        old: Any | None,
        serving: Any | None,
    ) -> DeployedService:
        """Start `image` beside the stopped `old`; keep it if healthy, else restart `serving`."""
        logger = run_logger()
        name = container_name(self.prefix, env.name, service.name)
        try:
            new = self._start(env, service, image, f"{name}-next")
        except DeployError as exc:
            raise DeployError(f"{exc}; {self._bring_back(env, service, serving)}") from exc
        result = self._watch(new, env, service, image.digest, deadline_s)
        if result.ok:
            if old is not None:
                _remove_container(old)
            new.rename(name)
            logger.info("%s %s is healthy in %s", service.name, image.short, env.name)
            return deployed_from_labels(new.labels, self.address(env, service))
        logs = _last_words(new)
        new.reload()
        new.remove(force=True)
        outcome = self._bring_back(env, service, serving)
        msg = (
            f"{service.name} {image.short} failed its health check in {env.name} "
            f"(container {new.status}): {'; '.join(result.failures)}; "
            f"logs: {logs or '(none)'}; {outcome}"
        )
        logger.error(msg)
        raise DeployError(msg)

    def start_green(
        self,
        env: EnvironmentSpec,
        service: ServiceSpec,
        image: ImageRef,
        green_offset: int,
        *,
        deadline_s: float,
    ) -> str:
        """Start `image` as `service`'s green container in `env`, on green_offset + its port,
        beside the serving (blue) one, which it never touches; returns its address once it
        is healthy on `image.digest`.

        Raises:
            DeployError: green did not become healthy (it is removed; blue serves on).
        """
        green_env = env.model_copy(update={"local_port_offset": green_offset})
        name = container_name(self.prefix, env.name, service.name) + GREEN_SUFFIX
        with _engine_errors(f"start {image.reference} as green in {env.name}"):
            self._remove(name)  # one left by a run that died
            green = self._start(green_env, service, image, name)
            result = self._watch(green, green_env, service, image.digest, deadline_s)
            if result.ok:
                run_logger().info(
                    "%s %s is healthy as green in %s", service.name, image.short, env.name
                )
                return self.address(green_env, service)
            logs = _last_words(green)
            _remove_container(green)
        msg = (
            f"{service.name} {image.short} failed its health check as green in {env.name}: "
            f"{'; '.join(result.failures)}; logs: {logs or '(none)'}; green removed, the "
            "serving release untouched"
        )
        raise DeployError(msg)

    def greens(self, env: EnvironmentSpec) -> list[str]:
        """The services of `env` that have a green container (running or not)."""
        prefix = container_name(self.prefix, env.name, "")
        with _engine_errors(f"list the green containers of {env.name}"):
            found = self.client.containers.list(all=True, filters={"name": prefix})
        names = (str(c.name) for c in found)
        return sorted(
            n.removeprefix(prefix).removesuffix(GREEN_SUFFIX)
            for n in names
            if n.startswith(prefix) and n.endswith(GREEN_SUFFIX)
        )

    def remove_green(self, env: EnvironmentSpec, service: ServiceSpec) -> None:
        """Remove `service`'s green container in `env`, if there is one."""
        name = container_name(self.prefix, env.name, service.name) + GREEN_SUFFIX
        with _engine_errors(f"remove {name}"):
            self._remove(name)

    def restore(
        self, env: EnvironmentSpec, service: ServiceSpec, previous: DeployedService | None
    ) -> None:
        """Redeploy `previous`, or remove the service from `env` when it is None."""
        if previous is None:
            name = container_name(self.prefix, env.name, service.name)
            with _engine_errors(f"remove {name}"):
                self._remove(f"{name}-next")
                self._remove(name + GREEN_SUFFIX)
                self._remove(name)
            run_logger().info("%s removed from %s", service.name, env.name)
            return
        self.deploy(env, service, previous.image, deadline_s=self.health_deadline_s)

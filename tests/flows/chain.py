"""A small promotion chain for flow tests: two services, environments of the test's own.

Each test module names its environments and host ports, so modules never meet in the
shared engine or ledger.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path
from typing import Any

import docker
import docker.errors
import yaml

from blocks.config import PipelineConfig
from blocks.repository import GitRepository, pinned_repository
from core.records import ImageRef
from core.settings import Settings
from tasks.deploy.docker import DockerDeployer, container_name
from tasks.deploy.target import Deployer
from tasks.images import ENGINE_STORE_RACE
from tasks.registry import manifest_digest
from tasks.releases import ReleaseRecord
from tests.ledgers import current_ledger

SERVICES = ["course", "course-b"]
PREFIX = "elice"


def write_chain_config(
    path: Path,
    environments: list[tuple[str, int]],
    services: list[tuple[str, int]] | None = None,
    *,
    performance: dict[str, Any] | None = None,
    **extra: dict[str, Any],
) -> str:
    """A pipeline config whose environments promote one into the next, in order.

    `environments` gives (name, host port offset); `services` (name, port), default
    course and course-b; `performance` overrides fields of the load probe's settings;
    `extra` adds fields by environment name (a registry, a target).
    """
    envs: list[dict[str, Any]] = []
    for index, (name, offset) in enumerate(environments):
        env: dict[str, Any] = {
            "name": name,
            "namespace": name,
            "replicas": {"min": 1, "max": 1},
            "log_level": "INFO",
            "storage": "minio",
            "local_port_offset": offset,
        }
        if index:
            env["promotes_from"] = environments[index - 1][0]
        envs.append(env | extra.get(name, {}))
    data = {
        "services": [
            {"name": name, "port": port, "libs": ["servicekit"]}
            for name, port in (services or [("course", 8004), ("course-b", 8005)])
        ],
        "libs": [{"name": "servicekit", "libs": []}],
        "environments": envs,
        # The slack is the tests' noise floor: with 8 requests the p95 is the slowest one,
        # and on two busy cores one stall of the host (seen: 520 and 785 ms) put a healthy
        # release over a 500 ms slack. The latency drill (2000 ms) stays over 1500 ms.
        "performance": {"requests": 8, "concurrency": 4, "min_p95_slack_ms": 1500}
        | (performance or {}),
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def remove_containers(client: docker.DockerClient, environments: list[str]) -> None:
    """Every container of SERVICES in `environments`, the blue/green spares included."""
    for env in environments:
        for service in SERVICES:
            for suffix in ("", "-next", "-green"):
                try:
                    client.containers.get(container_name(PREFIX, env, service) + suffix).remove(
                        force=True
                    )
                except docker.errors.NotFound:
                    pass


def derive(client: docker.DockerClient, base: ImageRef, variant: str) -> ImageRef:
    """An image FROM `base` with one more label, pushed; same commit label as `base`."""
    source = f"{base.repository}:{base.tag}" if base.tag else base.reference
    dockerfile = f"FROM {source}\nLABEL io.elice.test.variant={variant}\n"
    tag = f"variant-{variant}-{base.short}"
    for attempt in range(3):  # the engine's store may change under the build (tasks/images.py)
        try:
            client.images.build(
                fileobj=io.BytesIO(dockerfile.encode()), tag=f"{base.repository}:{tag}"
            )
            break
        except docker.errors.BuildError as exc:
            if attempt == 2 or not ENGINE_STORE_RACE.search(str(exc)):
                raise
    for chunk in client.api.push(base.repository, tag=tag, stream=True, decode=True):
        assert "error" not in chunk, chunk
    digest = manifest_digest(base.repository, tag)
    return base.model_copy(update={"digest": digest, "tag": tag})


def as_service(image: ImageRef, service: str) -> ImageRef:
    """The same image, recorded as `service`'s."""
    return image.model_copy(update={"service": service})


def protected_tip(repository: GitRepository | None = None) -> str:
    """The commit the protected branch of `repository` points at now (default: the
    repository the flows of this process load): a commit a promotion accepts."""
    repo = repository or pinned_repository(Settings.from_environ())
    listed = subprocess.run(
        ["git", "ls-remote", repo.url, repo.protected_ref],
        capture_output=True,
        text=True,
        check=True,
    )
    return listed.stdout.split()[0]


def put_release(
    deployer: Deployer,
    cfg: PipelineConfig,
    env: str,
    service: str,
    image: ImageRef,
    *,
    release_id: str,
    verified: bool = True,
    commit: str | None = None,
) -> None:
    """What CI does for its environment: deploy `image` as `service` and record it, built
    from `commit` (default: the tip of the protected branch the flows load)."""
    ref = as_service(image, service)
    deployer.deploy(cfg.environment(env), cfg.service(service), ref, deadline_s=60)
    current_ledger().record_deploy(
        env,
        ReleaseRecord(
            service=service,
            environment=env,
            image=ref,
            release_id=release_id,
            verified=verified,
            ref="refs/heads/main",
            commit=commit or protected_tip(),
            scan="clean",
        ),
    )


def put_verified(
    cfg: PipelineConfig, env: str, service: str, image: ImageRef, commit: str | None = None
) -> None:
    """What CI does for its environment: deploy `image` and record it verified."""
    release = f"seed-{image.short}"
    put_release(DockerDeployer(), cfg, env, service, image, release_id=release, commit=commit)
    current_ledger().mark_verified(env, service, None)

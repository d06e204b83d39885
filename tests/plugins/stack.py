"""Fixtures for the local stack: engine, registry, one real service image.

The engine and registry live in a stable directory shared by test sessions
(ELICE_STACK_DIR, default /var/tmp/elice-test-stack), so the base image and the build
cache survive between runs; a fresh machine installs and starts everything itself.

Session fixtures:
- `stack`: `StackInfo` from `ensure_stack()` (docker_host, registry "127.0.0.1:PORT",
  base_image, pause_image).
- `docker_client`: a docker-py `DockerClient` for `stack.docker_host`.
- `registry_url`: "http://127.0.0.1:PORT" of the local registry.
- `oci_registry`: `OciRegistry` block for the local registry (insecure, namespace "elice").
- `built_image`: `BuiltImage` of the `course` service, built once per session with a
  unique version/commit (tags `0.1.0-t<hex>`, `sha-<hex>`).
- `pushed_image`: `ImageRef` of `built_image` pushed to the local registry.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from blocks.config import PipelineConfig
from blocks.registry import OciRegistry
from blocks.stack import StackInfo
from core.records import ImageRef
from stack.control import ensure_stack
from tasks.images import BuiltImage, build_image, image_repository, local_ca_bundle, push_image

os.environ.setdefault("ELICE_STACK_DIR", "/var/tmp/elice-test-stack")
IMAGE_SERVICE = "course"


@pytest.fixture(scope="session")
def stack() -> StackInfo:
    """The running local stack (started or reused)."""
    return ensure_stack(root=Path(os.environ["ELICE_STACK_DIR"]))


@pytest.fixture(scope="session")
def docker_client(stack: StackInfo) -> Iterator[docker.DockerClient]:
    """docker-py client of the stack's engine."""
    client = docker.DockerClient(base_url=stack.docker_host, timeout=600)
    yield client
    client.close()


@pytest.fixture(scope="session")
def registry_url(stack: StackInfo) -> str:
    """Base URL of the local OCI registry."""
    return f"http://{stack.registry}"


@pytest.fixture(scope="session")
def oci_registry(stack: StackInfo) -> OciRegistry:
    """The local registry as a block."""
    return OciRegistry(address=stack.registry, insecure=True)


@pytest.fixture(scope="session")
def built_image(stack: StackInfo, oci_registry: OciRegistry, config: PipelineConfig) -> BuiltImage:
    """One real service image, built once per session."""
    token = uuid.uuid4().hex
    return build_image.fn(
        config.service(IMAGE_SERVICE),
        docker_host=stack.docker_host,
        repository=image_repository(stack.registry, oci_registry.namespace, IMAGE_SERVICE),
        version=f"0.1.0-t{token[:8]}",
        commit=token,
        base_image=stack.base_image,
        source="https://example.invalid/elice/monorepo",
        extra_ca=local_ca_bundle(),
    )


@pytest.fixture(scope="session")
def pushed_image(stack: StackInfo, built_image: BuiltImage, oci_registry: OciRegistry) -> ImageRef:
    """`built_image` pushed to the local registry."""
    return push_image.fn(built_image, docker_host=stack.docker_host, registry=oci_registry)

"""The Docker API engine (Docker, or Podman's compatible service): where clients are made."""

from __future__ import annotations

import importlib
import sys

import docker

from blocks.stack import load_stack_info
from core.errors import ToolError


def docker_error(name: str) -> type[Exception]:
    """docker-py's exception class `name` (NotFound, APIError...) as docker-py raises it now.

    Looked up when an error is caught, not bound at import: in a deployment run Prefect
    imports docker lazily (`prefect.utilities.dockerutils`), and a worker's flow run was
    seen with two copies of `docker.errors` loaded, so a class imported at module load
    did not match what docker-py raised (see `prefect.utilities.importtools.lazy_import`).
    """
    module = sys.modules.get("docker.errors") or importlib.import_module("docker.errors")
    error: type[Exception] = getattr(module, name)
    return error


def resolve_docker_host(docker_host: str | None = None) -> str:
    """The engine to use: `docker_host`, else the one the local stack runs.

    The caller passes the block's engine or the user setting DOCKER_HOST (read once, by
    the command line or at a flow's start: `core.settings`).

    Raises:
        ToolError: none of them names an engine.
    """
    if docker_host:
        return docker_host
    info = load_stack_info()
    if info is None:
        msg = "no Docker engine: set DockerTarget.docker_host or DOCKER_HOST, or `cicd stack up`"
        raise ToolError(msg)
    return info.docker_host


def engine_client(docker_host: str, timeout: int = 600) -> docker.DockerClient:
    """A connected docker-py client for the engine at `docker_host`.

    Raises:
        ToolError: the engine does not answer.
    """
    try:
        client = docker.DockerClient(base_url=docker_host, timeout=timeout)
        client.ping()
    except docker_error("DockerException") as exc:
        msg = f"Docker API engine at {docker_host} does not answer ({exc}); run `cicd stack up`"
        raise ToolError(msg) from exc
    return client

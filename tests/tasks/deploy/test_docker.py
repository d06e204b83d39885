"""The docker deploy target against the real engine and registry of the local stack."""

from __future__ import annotations

import io
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import docker
import httpx
import pytest

from blocks.catalog import ServiceSpec
from blocks.config import PipelineConfig
from blocks.docker_target import DockerTarget
from blocks.environments import EnvironmentSpec, Replicas
from blocks.stack import StackInfo
from core.errors import DeployError, ToolError
from core.records import ImageRef
from tasks.deploy.docker import (
    DockerDeployer,
    container_env,
    container_labels,
    container_name,
    deployed_from_labels,
    log_excerpt,
)
from tasks.images import BuiltImage, push_image
from tasks.registry import copy_image
from tests.plugins.registries import AuthRegistry

TEST_ENV = EnvironmentSpec(
    name="test-docker",
    namespace="test-docker",
    replicas=Replicas(min=1, max=1),
    log_level="INFO",
    storage="minio",
    local_port_offset=33000,
)
AUTH = ServiceSpec(name="auth", port=8002)
IMAGE = ImageRef(
    service="auth",
    repository="127.0.0.1:5000/elice/auth",
    digest="sha256:" + "c" * 64,
    tag="1.0.0-abc1234",
    version="1.0.0",
    commit="abc1234",
)


def test_container_name_and_address() -> None:
    assert container_name("elice", "dev", "auth") == "elice-dev-auth"
    deployer = DockerDeployer("unix:///nowhere.sock")
    assert deployer.address(TEST_ENV, AUTH) == "http://127.0.0.1:41002"


def test_container_env_pins_port_release_and_lets_extra_win() -> None:
    env = container_env(TEST_ENV, AUTH, IMAGE, {"FAULT_HEALTH": "1", "LOG_LEVEL": "DEBUG"})
    assert env == {
        "PORT": "41002",
        "HOST": "127.0.0.1",
        "LOG_LEVEL": "DEBUG",
        "ENVIRONMENT": "test-docker",
        "APP_VERSION": "1.0.0",
        "APP_RELEASE": "1.0.0-abc1234",
        "IMAGE_DIGEST": IMAGE.digest,
        "GIT_COMMIT": "abc1234",
        "FAULT_HEALTH": "1",
    }


def test_labels_round_trip_to_the_deployed_service() -> None:
    when = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    labels = container_labels(TEST_ENV, IMAGE, when)
    deployed = deployed_from_labels({**labels, "other": "x"}, "http://127.0.0.1:41002")
    assert deployed.image == IMAGE
    assert (deployed.service, deployed.environment, deployed.deployed_at) == (
        "auth",
        "test-docker",
        when,
    )
    assert deployed.target == "docker"


def test_log_excerpt_keeps_start_up_and_end() -> None:
    text = "\n".join(f"line {i}" for i in range(100)) + "\n" + "x" * 1000
    excerpt = log_excerpt(text, lines=3).splitlines()
    assert excerpt == ["line 0", "line 1", "line 2", "...", "line 98", "line 99", "x" * 300]
    assert log_excerpt("a\nb\n") == "a\nb"


def test_foreign_container_labels_are_refused() -> None:
    with pytest.raises(ValueError, match="managed-by"):
        deployed_from_labels({"io.elice.service": "auth"}, "http://127.0.0.1:1")


def test_deployer_from_block_takes_its_settings() -> None:
    block = DockerTarget(
        docker_host="unix:///x.sock",
        name_prefix="blue",
        health_deadline_s=5,
        environment_env={"dev": {"A": "1"}},
    )
    deployer = DockerDeployer.from_block(block, {IMAGE.digest: {"FAULT_HEALTH": "1"}})
    assert (deployer.docker_host, deployer.prefix, deployer.health_deadline_s) == (
        "unix:///x.sock",
        "blue",
        5,
    )
    assert deployer.environment_env == {"dev": {"A": "1"}}
    assert deployer.extra_env == {IMAGE.digest: {"FAULT_HEALTH": "1"}}


def test_image_of_another_service_is_refused_before_touching_the_engine() -> None:
    deployer = DockerDeployer("unix:///nowhere.sock")
    with pytest.raises(ValueError, match="not 'user'"):
        deployer.deploy(TEST_ENV, ServiceSpec(name="user", port=8003), IMAGE, deadline_s=5)


@pytest.mark.parametrize("answer", [b"", b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{"])
def test_an_engine_that_drops_the_connection_is_a_tool_error(answer: bytes) -> None:
    """docker-py converts only HTTP errors; a connection closed before or in the middle of
    an answer (the engine answered its version first) must still reach the pipeline as its
    own (retryable) ToolError."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]

    def drop() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while request := conn.recv(65536):
                    if b" /version " not in request.split(b"\r\n", 1)[0]:
                        conn.sendall(answer)  # then closed: dropped mid-answer
                        break
                    body = b'{"ApiVersion": "1.41", "Version": "4.3.1"}'
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                    )

    threading.Thread(target=drop, daemon=True).start()
    try:
        deployer = DockerDeployer(f"tcp://127.0.0.1:{port}")
        with pytest.raises(ToolError, match="Docker engine unreachable while trying to inspect"):
            deployer.live(TEST_ENV, ServiceSpec(name="user", port=8003))
    finally:
        server.close()


# --- against the real engine and registry ---------------------------------------------

PREFIX = "elicetest"
# Generous: container start-up on two shared cores; a failing release waits this long.
DEADLINE_S = 120.0
BROKEN_DEADLINE_S = 30.0
RACE_ROUNDS = 40


@pytest.fixture(scope="module")
def derived_image(
    stack: StackInfo, docker_client: docker.DockerClient, built_image: BuiltImage
) -> ImageRef:
    """A second real release of the same service: the built image plus one label."""
    tag = f"derived-{uuid.uuid4().hex[:8]}"
    dockerfile = f"FROM {built_image.references[0]}\nLABEL io.elice.test.release={tag}\n"
    image, _ = docker_client.images.build(
        fileobj=io.BytesIO(dockerfile.encode()), tag=f"{built_image.repository}:{tag}", rm=True
    )
    derived = built_image.model_copy(update={"image_id": image.id, "tags": (tag,)})
    return push_image.fn(derived, docker_host=stack.docker_host)


@pytest.fixture
def service(config: PipelineConfig, pushed_image: ImageRef) -> ServiceSpec:
    return config.service(pushed_image.service)


@pytest.fixture
def deployer(stack: StackInfo, service: ServiceSpec) -> Iterator[DockerDeployer]:
    deployer = DockerDeployer(stack.docker_host, PREFIX, health_deadline_s=DEADLINE_S)
    yield deployer
    deployer.restore(TEST_ENV, service, None)


def served_digest(deployer: DockerDeployer, service: ServiceSpec) -> str:
    body = httpx.get(deployer.address(TEST_ENV, service) + "/version", timeout=10).json()
    assert body["environment"] == "test-docker"
    return str(body["digest"])


def container_names(docker_client: docker.DockerClient) -> set[str]:
    return {c.name for c in docker_client.containers.list(all=True)}


def test_deploy_serves_the_release_and_live_reads_it_back(
    deployer: DockerDeployer,
    service: ServiceSpec,
    pushed_image: ImageRef,
    docker_client: docker.DockerClient,
) -> None:
    assert deployer.live(TEST_ENV, service) is None
    deployed = deployer.deploy(TEST_ENV, service, pushed_image, deadline_s=DEADLINE_S)
    assert deployed.image == pushed_image
    assert deployed.address == f"http://127.0.0.1:{service.port + 33000}"
    assert served_digest(deployer, service) == pushed_image.digest
    assert deployer.live(TEST_ENV, service) == deployed
    name = container_name(PREFIX, TEST_ENV.name, service.name)
    assert name in container_names(docker_client)
    assert f"{name}-next" not in container_names(docker_client)


def test_unhealthy_release_is_rolled_back_to_the_previous_one(
    stack: StackInfo,
    deployer: DockerDeployer,
    service: ServiceSpec,
    pushed_image: ImageRef,
    derived_image: ImageRef,
    docker_client: docker.DockerClient,
) -> None:
    deployer.deploy(TEST_ENV, service, pushed_image, deadline_s=DEADLINE_S)
    drill = DockerDeployer(
        stack.docker_host,
        PREFIX,
        {derived_image.digest: {"FAULT_HEALTH": "1"}},
        health_deadline_s=DEADLINE_S,
    )
    with pytest.raises(DeployError) as caught:
        drill.deploy(TEST_ENV, service, derived_image, deadline_s=BROKEN_DEADLINE_S)
    message = str(caught.value)
    assert message.startswith(
        f"{service.name} {derived_image.short} failed its health check in test-docker"
    )
    assert "/health: answered 503; /ready: answered 503" in message
    assert "fault injection active" in message  # the new container's own log lines
    assert message.endswith(f"previous release {pushed_image.short} restored")
    live = deployer.live(TEST_ENV, service)
    assert live is not None
    assert live.image == pushed_image
    assert served_digest(deployer, service) == pushed_image.digest
    name = container_name(PREFIX, TEST_ENV.name, service.name)
    assert f"{name}-next" not in container_names(docker_client)


def test_a_release_whose_container_exits_fails_at_once_not_at_the_deadline(
    stack: StackInfo,
    deployer: DockerDeployer,
    service: ServiceSpec,
    pushed_image: ImageRef,
    derived_image: ImageRef,
) -> None:
    deployer.deploy(TEST_ENV, service, pushed_image, deadline_s=DEADLINE_S)
    # an address this machine does not have: the server cannot bind and the process exits
    drill = DockerDeployer(
        stack.docker_host,
        PREFIX,
        {derived_image.digest: {"HOST": "203.0.113.1"}},
        health_deadline_s=DEADLINE_S,
    )
    with pytest.raises(DeployError) as caught:
        drill.deploy(TEST_ENV, service, derived_image, deadline_s=DEADLINE_S)
    message = str(caught.value)
    # the verdict names the exit: it came from watching the container, not from the
    # deadline running out (a deadline failure lists the failed probes only)
    assert "the container exited (exit code" in message
    assert "before it was healthy" in message
    assert message.endswith(f"previous release {pushed_image.short} restored")
    assert served_digest(deployer, service) == pushed_image.digest


def test_a_release_that_says_why_after_its_deadline_is_reported_with_its_reason(
    stack: StackInfo,
    deployer: DockerDeployer,
    service: ServiceSpec,
    derived_image: ImageRef,
) -> None:
    """Issue 20: a failed deploy said "logs: (none)" for a container that printed its reason
    to stderr: the deadline ran out while it was still starting, and it was removed before
    it said why. Here it cannot bind its address and says so on stderr, after a deadline
    shorter than its start-up."""
    drill = DockerDeployer(
        stack.docker_host,
        PREFIX,
        {derived_image.digest: {"HOST": "203.0.113.1"}},
        health_deadline_s=DEADLINE_S,
    )
    with pytest.raises(DeployError) as caught:
        drill.deploy(TEST_ENV, service, derived_image, deadline_s=0.2)
    message = str(caught.value)
    assert "logs: (none)" not in message
    logs = message.split("logs: ", 1)[1]
    assert "203.0.113.1" in logs  # the bind error, from the container's stderr


def test_new_release_replaces_the_old_and_restore_puts_it_back(
    deployer: DockerDeployer,
    service: ServiceSpec,
    pushed_image: ImageRef,
    derived_image: ImageRef,
    docker_client: docker.DockerClient,
) -> None:
    previous = deployer.deploy(TEST_ENV, service, pushed_image, deadline_s=DEADLINE_S)
    deployer.deploy(TEST_ENV, service, derived_image, deadline_s=DEADLINE_S)
    assert served_digest(deployer, service) == derived_image.digest
    name = container_name(PREFIX, TEST_ENV.name, service.name)
    assert [n for n in container_names(docker_client) if n.startswith(name)] == [name]

    deployer.restore(TEST_ENV, service, previous)
    live = deployer.live(TEST_ENV, service)
    assert live is not None
    assert live.image == pushed_image
    assert served_digest(deployer, service) == pushed_image.digest

    deployer.restore(TEST_ENV, service, None)
    assert deployer.live(TEST_ENV, service) is None
    assert name not in container_names(docker_client)
    with pytest.raises(httpx.ConnectError):
        httpx.get(deployer.address(TEST_ENV, service) + "/health", timeout=5)


def test_live_reads_a_container_removed_while_it_looks_as_none(
    stack: StackInfo, deployer: DockerDeployer, service: ServiceSpec
) -> None:
    """Removal racing an inspect: a 404 on Docker, a 500 "no such container" on Podman.

    A promotion's watcher and a deploy's remove meet exactly so; either answer means
    nothing is served under that name, so `live()` says None and does not raise.
    """
    name = container_name(PREFIX, TEST_ENV.name, service.name)
    client = docker.DockerClient(base_url=stack.docker_host)
    looks = 0
    try:
        for _ in range(RACE_ROUNDS):
            container = client.containers.create(stack.pause_image, name=name)
            remover = threading.Thread(target=container.remove, kwargs={"force": True})
            remover.start()
            while remover.is_alive():
                assert deployer.live(TEST_ENV, service) is None  # created, never started
                looks += 1
            remover.join()
    finally:
        client.close()
    assert looks >= RACE_ROUNDS


def _release_only_in(
    registry: AuthRegistry,
    stack: StackInfo,
    docker_client: docker.DockerClient,
    built_image: BuiltImage,
) -> ImageRef:
    """A new release of the service in `registry` only: built, copied there, then
    removed from the engine, so running it means pulling it with that registry's login."""
    tag = f"pull-{uuid.uuid4().hex[:8]}"
    dockerfile = f"FROM {built_image.references[0]}\nLABEL io.elice.test.release={tag}\n"
    image, _ = docker_client.images.build(
        fileobj=io.BytesIO(dockerfile.encode()), tag=f"{built_image.repository}:{tag}", rm=True
    )
    ci = push_image.fn(
        built_image.model_copy(update={"image_id": image.id, "tags": (tag,)}),
        docker_host=stack.docker_host,
    )
    there = copy_image(ci, registry.block)
    docker_client.images.remove(image.id, force=True)
    return there


def pulls(docker_client: docker.DockerClient, since: float, of: str) -> list[str]:
    """What the engine pulled since `since` (epoch seconds) whose name holds `of` (a digest,
    a registry's address), from its event stream: the engine is shared with the tests running
    beside this one, so their pulls are left out."""
    events = docker_client.events(
        since=int(since), until=int(time.time()) + 1, decode=True, filters={"type": "image"}
    )
    return [
        str(event.get("Actor", {}).get("Attributes", {}).get("name") or event.get("id"))
        for event in events
        if event.get("Action") == "pull"
        and of in str(event.get("Actor", {}).get("Attributes", {}).get("name") or event.get("id"))
    ]


def test_a_release_the_engine_has_runs_from_its_own_copy_without_a_pull(
    deployer: DockerDeployer,
    service: ServiceSpec,
    pushed_image: ImageRef,
    built_image: BuiltImage,
    docker_client: docker.DockerClient,
) -> None:
    since = time.time() - 1
    deployer.deploy(TEST_ENV, service, pushed_image, deadline_s=DEADLINE_S)
    assert served_digest(deployer, service) == pushed_image.digest
    running = docker_client.containers.get(container_name(PREFIX, TEST_ENV.name, service.name))
    assert running.attrs["Image"] == built_image.image_id  # the registry manifest's config
    assert pulls(docker_client, since, pushed_image.digest) == []  # built here: no fetch


def test_a_release_the_engine_lacks_is_pulled_with_its_registrys_login(
    stack: StackInfo,
    service: ServiceSpec,
    built_image: BuiltImage,
    basic_registry: AuthRegistry,
    docker_client: docker.DockerClient,
) -> None:
    image = _release_only_in(basic_registry, stack, docker_client, built_image)
    anonymous = DockerDeployer(stack.docker_host, PREFIX, health_deadline_s=DEADLINE_S)
    with pytest.raises(DeployError, match="not found in the registry or the engine"):
        anonymous.deploy(TEST_ENV, service, image, deadline_s=DEADLINE_S)
    deployer = DockerDeployer(
        stack.docker_host, PREFIX, health_deadline_s=DEADLINE_S, registries=[basic_registry.block]
    )
    since = time.time() - 1
    try:
        deployer.deploy(TEST_ENV, service, image, deadline_s=DEADLINE_S)
        assert served_digest(deployer, service) == image.digest
        assert set(pulls(docker_client, since, basic_registry.address)) == {image.reference}
    finally:
        deployer.restore(TEST_ENV, service, None)

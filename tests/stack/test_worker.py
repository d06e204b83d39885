"""A real process worker runs a deployment started the way the UI starts one; the image."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import docker
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType, TaskRun
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL

from blocks.registry import OciRegistry
from blocks.stack import StackInfo
from core.errors import ConfigError, RegistryError
from core.records import ImageRef
from reconcile.setup import PROCESS_POOL, ensure_setup
from stack.supervisor import descendants
from stack.worker import ensure_worker, log_file, stop_worker, worker_pid
from stack.worker_image import WORKER_DOCKERFILE, build_worker_image, worker_build_context
from tasks.images import local_ca_bundle
from tasks.process import which
from tasks.registry import copy_image_by_digest, manifest_digest
from tests.plugins.registries import AuthRegistry
from tests.runs import task_runs_of

REPO = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (ProcessLookupError, FileNotFoundError):
        return False
    return not stat.rsplit(") ", 1)[-1].startswith("Z")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _keys(task_runs: list[TaskRun]) -> set[str]:
    """The tasks the runs are of (a task key without its hash)."""
    return {t.task_key.rsplit("-", 1)[0] for t in task_runs}


@pytest.fixture(scope="module")
def api_url() -> str:
    """The session's server, set up: pools, limits, blocks, prefect.yaml's deployments."""
    ensure_setup()
    return str(PREFECT_API_URL.value())


@pytest.mark.slow
def test_a_deployment_run_started_like_the_ui_completes_on_the_worker(
    api_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "stack"
    started = time.monotonic()
    pid = ensure_worker(root, api_url)
    print(f"worker {pid} online after {time.monotonic() - started:.1f}s")
    seen: dict[int, str] = {}
    try:
        assert worker_pid(root) == pid
        assert ensure_worker(root, api_url) == pid  # running and online: reused
        # CI of one service, as a worker runs it: in a worktree of its own, fetched from the
        # repository the worker pins (a checkout to use in place is refused on a worker).
        with get_client(sync_client=True) as client:  # each worker resolves it: not baked in
            [step] = client.read_deployment_by_name("ci/ci").pull_steps or []
        assert step == {
            "prefect.deployments.steps.set_working_directory": {"directory": "{{ $ELICE_REPO }}"}
        }
        parameters = {"services": ["auth"], "deliver": False}
        triggered = datetime.now(UTC)
        run = run_deployment(name="ci/ci", parameters=parameters, timeout=0)
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 600
            while True:
                seen.update({p: _cmdline(p) for p in descendants(pid)})
                flow_run = client.read_flow_run(run.id)
                if flow_run.state is not None and flow_run.state.is_final():
                    break
                assert time.monotonic() < deadline, f"still {flow_run.state}"
                time.sleep(0.3)
            assert flow_run.state.is_completed(), flow_run.state.message
            task_runs = task_runs_of(
                [run.id], lambda runs: _keys(runs) >= {"run_pytest", "run_ruff"}
            )
            keys = _keys(task_runs)
            states = client.read_flow_run_states(run.id)
        # It ran on the worker: a child process of the worker executed it, the worker
        # logged it, and its pool is the process pool.
        assert flow_run.work_pool_name == PROCESS_POOL
        assert any("prefect.engine" in cmd for cmd in seen.values()), seen
        assert str(run.id) in log_file(root).read_text()
        assert keys >= {"run_pytest", "run_ruff"}, keys

        first_task = min(t.start_time for t in task_runs if t.start_time is not None)
        when = {s.type: s.timestamp for s in reversed(states)}
        latency = (first_task - flow_run.created).total_seconds()
        print(
            f"trigger -> first task run: {latency:.2f}s (from the client's call: "
            f"{(first_task - triggered).total_seconds():.2f}s; picked up by the worker after "
            f"{(when[StateType.PENDING] - flow_run.created).total_seconds():.2f}s, flow "
            f"running after {(when[StateType.RUNNING] - flow_run.created).total_seconds():.2f}s;"
            f" run total {(flow_run.end_time - flow_run.created).total_seconds():.1f}s)"
        )
        assert latency < 60

        # Asked for another checkout, the worker is replaced, not duplicated.
        other = tmp_path / "other-checkout"
        other.mkdir()
        shutil.copy(REPO / "prefect.yaml", other / "prefect.yaml")
        replaced = ensure_worker(root, api_url, repo=other)
        assert replaced != pid
        assert not _alive(pid)
        seen[replaced] = _cmdline(replaced)
    finally:
        stopping = time.monotonic()
        assert stop_worker(root)
        print(f"worker stopped in {time.monotonic() - stopping:.1f}s")
    assert worker_pid(root) is None
    left = [p for p in (pid, *seen) if _alive(p)]
    assert not left, {p: _cmdline(p) for p in left}
    assert not stop_worker(root)


def test_a_stale_pid_file_is_not_a_worker(tmp_path: Path) -> None:
    (tmp_path / "pids").mkdir()
    (tmp_path / "pids" / "worker.pid").write_text(str(os.getpid()))  # alive, but pytest
    assert worker_pid(tmp_path) is None
    (tmp_path / "pids" / "worker.pid").write_text(f"{os.getpid()} 1")  # and started earlier
    assert worker_pid(tmp_path) is None
    assert not stop_worker(tmp_path)
    assert _alive(os.getpid())


def test_a_worker_needs_a_checkout_of_the_pipeline(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no prefect\.yaml"):
        ensure_worker(tmp_path / "stack", "http://127.0.0.1:9/api", repo=tmp_path)
    assert worker_pid(tmp_path / "stack") is None


def test_worker_dockerfile_passes_hadolint() -> None:
    done = subprocess.run(
        [which("hadolint"), "--failure-threshold", "warning", str(REPO / WORKER_DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_worker_build_context_holds_the_pipeline_only() -> None:
    names = tarfile.open(fileobj=worker_build_context(REPO, "PEM")).getnames()
    for wanted in (
        "worker/Dockerfile",
        "uv.lock",
        "pyproject.toml",
        "prefect.yaml",
        "flows/ci.py",
        "tasks/security.py",
        "config/pipeline.yaml",
        ".build/extra-ca.crt",
    ):
        assert wanted in names
    assert not [n for n in names if n.startswith(("services/", "libs/", "tests/", ".venv/"))]
    assert not [n for n in names if "__pycache__" in n]


def run_in(
    client: docker.DockerClient,
    tag: str,
    command: list[str],
    *,
    network_mode: str = "none",
    environment: dict[str, str] | None = None,
) -> str:
    """Run `command` in the image `tag`; its output (it must exit 0).

    Wait, then read the logs, then remove: with `remove=True` Podman can drop the end of
    a fast container's output (seen under load: a line missing).
    """
    container = client.containers.run(
        tag, command, detach=True, network_mode=network_mode, environment=environment or {}
    )
    try:
        status = container.wait(timeout=300)
        out = container.logs(stdout=True, stderr=True).decode()
        assert status["StatusCode"] == 0, out
        return str(out)
    finally:
        container.remove(force=True)


@pytest.fixture(scope="module")
def worker_image(stack: StackInfo, docker_client: docker.DockerClient) -> Iterator[str]:
    """The worker image, built once for this module's tests; its tag."""
    tag = f"localhost/elice-devops-worker:test-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    image_id = build_worker_image(
        stack.docker_host, tag, base_image=stack.base_image, extra_ca=local_ca_bundle()
    )
    print(f"worker image {image_id[:19]} built in {time.monotonic() - started:.0f}s")
    try:
        yield tag
    finally:
        _keep_as_cache(docker_client, tag)


@pytest.mark.stack
def test_worker_image_runs_prefect_and_the_flows_as_non_root(
    docker_client: docker.DockerClient, worker_image: str
) -> None:
    tag = worker_image
    image = docker_client.images.get(tag)
    assert image.attrs["Config"]["User"] == "10001:10001"
    assert image.attrs["Config"]["Cmd"] == [
        "python",
        "-m",
        "stack.trusted_worker",
        "start",
        "--pool",
        "elice-process",
        "--trust-file",
        "/etc/elice/trust.yaml",
    ]
    # its own command without a mounted trust file: refused, saying which file
    refused = docker_client.containers.run(tag, detach=True, network_mode="none")
    try:
        assert refused.wait(timeout=120)["StatusCode"] == 2
        assert "trust file /etc/elice/trust.yaml" in refused.logs().decode()
    finally:
        refused.remove(force=True)

    def run(*command: str) -> str:
        return run_in(docker_client, tag, list(command))

    assert "3.9." in run("prefect", "version")
    who = run("python", "-c", "import os, flows.ci; print(os.getuid(), os.getgid())")
    assert who.split() == ["10001", "10001"]
    tools = run(
        "sh",
        "-c",
        "git --version && uv --version && pip-audit --version && syft version"
        " && kubectl version --client && skopeo --version && echo ELICE_REPO=$ELICE_REPO",
    )
    assert "git version" in tools
    assert "skopeo version" in tools  # a promotion's image copy runs in this image
    assert "ELICE_REPO=/app" in tools
    assert run("sh", "-c", "test -w /app; echo $?").strip() == "1"  # code is read-only


# What a promotion's copy step runs (tasks.images.place_images -> copy_image), given the
# image and the two registries' logins as JSON in COPY_SPEC: nothing on the command line.
COPY_SCRIPT = """
import json, os
from pydantic import SecretStr
from blocks.registry import OciRegistry
from core.records import ImageRef
from tasks.registry import copy_image_by_digest

spec = json.loads(os.environ["COPY_SPEC"])
def login(r):
    return OciRegistry(address=r["address"], insecure=True,
                       username=SecretStr(r["username"]), password=SecretStr(r["password"]))
copied = copy_image_by_digest(ImageRef.model_validate(spec["image"]), spec["to"],
                              [spec["tag"]], source=login(spec["source"]),
                              target=login(spec["target"]))
print("COPIED", copied.repository, copied.tag, copied.digest)
"""


def _login(registry: AuthRegistry) -> dict[str, str]:
    return {
        "address": registry.address,
        "username": registry.username,
        "password": registry.password,
    }


@pytest.mark.stack
def test_the_worker_image_copies_a_release_between_two_authenticated_registries(
    docker_client: docker.DockerClient,
    worker_image: str,
    pushed_image: ImageRef,
    oci_registry: OciRegistry,
    basic_registry: AuthRegistry,
    token_registry: AuthRegistry,
) -> None:
    """A promotion run on the in-cluster worker copies the release into the next
    environment's registry: from one behind Basic auth to one behind Bearer tokens."""
    tag = f"worker-copy-{uuid.uuid4().hex[:8]}"
    service = pushed_image.service
    source = copy_image_by_digest(
        pushed_image,
        basic_registry.block.repository(service),
        [tag],
        source=oci_registry,
        target=basic_registry.block,
    )
    target_repo = token_registry.block.repository(service)
    spec = {
        "image": source.model_dump(mode="json"),
        "to": target_repo,
        "tag": tag,
        "source": _login(basic_registry),
        "target": _login(token_registry),
    }
    started = time.monotonic()
    out = run_in(
        docker_client,
        worker_image,
        ["python", "-c", COPY_SCRIPT],
        network_mode="host",  # the registries listen on loopback
        environment={"COPY_SPEC": json.dumps(spec)},
    )
    print(f"copy in the worker image: {time.monotonic() - started:.1f}s")
    assert f"COPIED {target_repo} {tag} {pushed_image.digest}" in out
    for secret in (basic_registry.password, token_registry.password):
        assert secret not in out
    # the digest arrived: read back from the target with its own login, and refused
    # to anyone without one
    assert manifest_digest(target_repo, tag, token_registry.block) == pushed_image.digest
    with pytest.raises(RegistryError, match="refused anonymous access"):
        manifest_digest(target_repo, tag, token_registry.anonymous())


CACHE_REPO, CACHE_VERSION = "localhost/elice-devops-worker", "last-test-build"
CACHE_TAG = f"{CACHE_REPO}:{CACHE_VERSION}"


def _keep_as_cache(client: docker.DockerClient, tag: str) -> None:
    """The image just built replaces the previous test build under CACHE_TAG, so the next
    build finds its layers in the engine's cache (the system packages' layer, and the
    whole image when the pipeline did not change). Removing each build removed its
    untagged parent layers with it, and every build ran `apt-get` again."""
    try:
        previous = client.images.get(CACHE_TAG).id
    except docker.errors.ImageNotFound:
        previous = None
    client.images.get(tag).tag(CACHE_REPO, CACHE_VERSION)
    client.images.remove(tag)  # only the tag: the image stays as CACHE_TAG
    if previous is not None and previous != client.images.get(CACHE_TAG).id:
        with contextlib.suppress(docker.errors.APIError):  # in use by another build: kept
            client.images.remove(previous)

"""The stack knows what it runs: its own processes on its own ports, or a clear failure.

Each stack here is a fresh one in a temporary directory on the session's engine
(DOCKER_HOST of the shared test stack: no second podman), so only docker-registry and
Prefect server processes start. Something else on a port is a real listener: a plain
HTTP server that answers 200 to everything, like a registry's /v2/ or Prefect's
/api/health would. Who holds a port is read with `ss`, not with the stack's own code.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import docker
import httpx
import pytest
import yaml
from typer.testing import CliRunner

from blocks.stack import StackInfo, load_stack_info, save_stack_info
from cicd.stack_cli import app
from core.errors import StackError
from stack.control import check_service_ports, ensure_stack, stack_status, stop_stack
from stack.ports import free_port, owning_stack, part_listens, port_free
from stack.steps import StackStep
from stack.supervisor import part_log, running_part, spawn_part, stop_part


class Impostor:
    """A plain HTTP server on a loopback port answering 200 `{}` to every request."""

    def __init__(self) -> None:
        seen: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: object) -> None:
                pass

        self.requests = seen
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def impostor() -> Iterator[Impostor]:
    server = Impostor()
    yield server
    server.close()


@pytest.fixture
def root(stack: StackInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh stack directory on the session's engine; its processes stop afterwards."""
    monkeypatch.setenv("DOCKER_HOST", stack.docker_host)
    home = tmp_path / "stack"
    home.mkdir()
    yield home
    stop_stack(home)


def listeners(port: int) -> set[int]:
    """Pids of the processes listening on TCP `port`, as `ss` sees them."""
    out = subprocess.run(
        ["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    return {int(pid) for pid in re.findall(r"pid=(\d+)", out)}


def recorded_pid(home: Path, name: str) -> int:
    return int((home / "pids" / f"{name}.pid").read_text().split()[0])


def port_of(address: str) -> int:
    return int(re.search(r":(\d+)(?:/api)?$", address).group(1))  # type: ignore[union-attr]


def held_by_session(port: int, leader: int) -> bool:
    """Every listener on `port` is `leader` or a process of its session."""
    pids = listeners(port)
    return bool(pids) and all(os.getsid(pid) == leader for pid in pids)


def push_blob(registry: str, blob: bytes) -> str:
    """Upload `blob` through the distribution API (monolithic upload); returns its digest."""
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    base = f"http://{registry}"
    with httpx.Client(base_url=base, timeout=30, trust_env=False) as client:
        started = client.post("/v2/probe/blobs/uploads/")
        assert started.status_code == 202, started.text
        location = httpx.URL(started.headers["location"]).copy_merge_params({"digest": digest})
        done = client.put(location, content=blob)
        assert done.status_code == 201, done.text
    return digest


def blob_file(home: Path, digest: str) -> Path:
    hexa = digest.removeprefix("sha256:")
    return home / "registry/data/docker/registry/v2/blobs/sha256" / hexa[:2] / hexa / "data"


@pytest.mark.stack
@pytest.mark.parametrize("how", ["recorded-port", "default-port"])
def test_a_taken_registry_port_means_another_port_and_our_own_registry(
    root: Path,
    stack: StackInfo,
    impostor: Impostor,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    taken = f"127.0.0.1:{impostor.port}"
    if how == "recorded-port":
        save_stack_info(
            StackInfo(docker_host=stack.docker_host, registry=taken, base_image=stack.base_image),
            root,
        )
    else:
        monkeypatch.setattr("stack.registry.DEFAULT_REGISTRY_PORT", impostor.port)
    steps: list[StackStep] = []
    info = ensure_stack(root=root, progress=steps.append)

    port = port_of(info.registry)
    assert port != impostor.port
    assert load_stack_info(root) == info  # stack.json says where it really is
    pid = recorded_pid(root, "registry")
    assert held_by_session(port, pid)  # the registry the stack started holds the port
    assert str(root) in Path(f"/proc/{pid}/cmdline").read_text()
    assert {p.name: (p.state, p.address) for p in stack_status(root)}["registry"] == (
        "running",
        info.registry,
    )
    # what is pushed lands in this stack's storage, not behind the other listener
    blob = os.urandom(64)
    assert blob_file(root, push_blob(info.registry, blob)).read_bytes() == blob
    assert impostor.requests == []  # the stack never mistook it for its registry

    lines = [s.line() for s in steps]
    moved = f"registry: starting docker-registry on {info.registry} ({taken} is taken by pid "
    assert any(line.startswith(moved) for line in lines), lines
    assert any(re.fullmatch(r"registry: ready in \d+\.\ds", line) for line in lines), lines

    assert ensure_stack(root=root) == info  # reused, not restarted, the other still there
    assert recorded_pid(root, "registry") == pid


@pytest.mark.stack
def test_a_live_pid_and_an_answer_on_the_port_are_not_a_running_registry(
    root: Path, stack: StackInfo, impostor: Impostor
) -> None:
    """The issue's case: the recorded pid lives and the recorded port answers /v2/, but the
    process listening there is not the one the stack started."""
    taken = f"127.0.0.1:{impostor.port}"
    save_stack_info(
        StackInfo(docker_host=stack.docker_host, registry=taken, base_image=stack.base_image),
        root,
    )
    decoy = spawn_part(root, "registry", ["sleep", "300"])
    assert running_part(root, "registry") == decoy
    assert httpx.get(f"http://{taken}/v2/", timeout=5).status_code == 200
    assert {p.name: p.state for p in stack_status(root)}["registry"] == "stopped"

    info = ensure_stack(root=root)
    assert info.registry != taken
    pid = recorded_pid(root, "registry")
    assert pid != decoy
    assert held_by_session(port_of(info.registry), pid)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{decoy}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{decoy}").exists()  # the stale part was ours: stopped


@pytest.mark.stack
def test_a_taken_prefect_port_means_another_port_and_our_own_server(
    root: Path, stack: StackInfo, impostor: Impostor
) -> None:
    taken = f"http://127.0.0.1:{impostor.port}/api"
    save_stack_info(
        StackInfo(
            docker_host=stack.docker_host,
            registry=f"127.0.0.1:{free_port()}",
            base_image=stack.base_image,
            prefect_api_url=taken,
        ),
        root,
    )
    steps: list[StackStep] = []
    info = ensure_stack(prefect=True, root=root, progress=steps.append)
    assert info.prefect_api_url
    assert info.prefect_api_url != taken
    port = port_of(info.prefect_api_url)
    assert held_by_session(port, recorded_pid(root, "prefect"))
    assert httpx.get(f"{info.prefect_api_url}/health", timeout=10).status_code == 200
    assert impostor.requests == []
    parts = {p.name: (p.state, p.address) for p in stack_status(root)}
    assert parts["prefect"] == ("running", info.prefect_api_url)
    lines = [s.line() for s in steps]
    moved = f"prefect: starting Prefect server on 127.0.0.1:{port} (127.0.0.1:{impostor.port}"
    assert any(line.startswith(moved) for line in lines), lines
    assert any(re.fullmatch(r"prefect: ready in \d+\.\ds", line) for line in lines), lines


BROKEN_REGISTRY_CONF = """\
version: 0.1
storage:
  nosuchdriver: {{}}
  filesystem:
    rootdirectory: {data}
http:
  addr: 127.0.0.1:{port}
"""


@pytest.mark.stack
def test_a_part_that_cannot_start_fails_stack_up_with_its_log_tail(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("stack.registry.REGISTRY_CONF", BROKEN_REGISTRY_CONF)
    steps: list[StackStep] = []
    started = time.monotonic()
    with pytest.raises(StackError) as caught:
        ensure_stack(root=root, progress=steps.append)
    assert time.monotonic() - started < 20  # an exit is noticed, not waited out
    message = str(caught.value)
    assert "docker-registry exited with code" in message
    assert f"last lines of {part_log(root, 'registry')}" in message
    assert "storage" in message.lower()  # the registry's own complaint, from its log
    assert running_part(root, "registry") is None
    assert load_stack_info(root) is None  # nothing recorded as running
    assert [(s.part, s.state) for s in steps if s.part == "registry"] == [
        ("registry", "start"),
        ("registry", "failed"),
    ]

    monkeypatch.setenv("ELICE_STACK_DIR", str(root))
    result = CliRunner().invoke(app, ["up"])
    assert result.exit_code == 1
    assert "stack up failed" in result.output
    assert "registry: starting docker-registry on 127.0.0.1:" in result.output
    assert "storage" in result.output.lower()
    assert "Traceback" not in result.output


# --- several stacks on one machine (issue 20, item 5) ------------------------------------


def _free_fixed_port() -> int:
    """A free loopback port below the ephemeral range (a service's port + an offset)."""
    for port in range(41000 + os.getpid() % 500, 42000):
        if port_free(port):
            return port
    raise AssertionError("no free port in 41000-41999")


@pytest.fixture
def held_port(stack: StackInfo, docker_client: docker.DockerClient) -> Iterator[int]:
    """A port a service container of the shared test stack listens on (host network)."""
    port = _free_fixed_port()
    container = docker_client.containers.run(
        stack.base_image,
        ["python3", "-c", SERVE_HTTP, str(port)],
        network_mode="host",
        detach=True,
        name=f"elicetest-ports-{port}",
    )
    try:
        deadline = time.monotonic() + 60
        while not listeners(port):
            assert time.monotonic() < deadline, container.logs().decode()
            time.sleep(0.2)
        yield port
    finally:
        container.remove(force=True)


def test_a_second_stack_refuses_ports_another_stacks_services_hold(
    stack: StackInfo,
    held_port: int,
    root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A checkout's `stack up` whose dev services would listen where the test stack's
    container listens is refused, naming that stack, before anything starts; the shared
    engine's own stacks and disjoint ports go on side by side."""
    shared = Path(stack.docker_host.removeprefix("unix://")).parent
    pids = listeners(held_port)
    assert {owning_stack(pid) for pid in pids} == {shared}  # read from its container monitor
    # the test suite's stacks run on its shared engine (DOCKER_HOST): beside anyone's
    check_service_ports(root, {held_port: "dev api-gateway"})

    raw = yaml.safe_load(Path("config/pipeline.yaml").read_text())
    offsets = {"dev": held_port - 8001, "staging": held_port - 8001 + 100, "production": 1}
    for env in raw["environments"]:
        env["local_port_offset"] = offsets[env["name"]]
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(raw))
    other = tmp_path / "other-checkout"
    monkeypatch.delenv("DOCKER_HOST")  # a stack with an engine of its own
    monkeypatch.setenv("ELICE_STACK_DIR", str(other))
    monkeypatch.setenv("ELICE_CONFIG", str(config))
    result = CliRunner().invoke(app, ["up", "--no-prefect"])
    assert result.exit_code == 1, result.output
    assert "stack up failed" in result.output
    output = " ".join(result.output.split())
    assert f"the stack at {shared} holds 127.0.0.1:{held_port} (dev api-gateway, pid" in output
    assert "local_port_offset" in output
    assert list(other.glob("*")) == []  # refused before anything started (its home is made)

    # side by side: a stack whose services listen elsewhere is not refused
    check_service_ports(other, {held_port + 1: "dev api-gateway"})


# --- the process helpers, without the stack ---------------------------------------------

SERVE_HTTP = "import http.server, sys; http.server.test(port=int(sys.argv[1]), bind='127.0.0.1')"
SERVE_UNIX = (
    "import socket, sys, time; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); "
    "s.listen(); print('listening', flush=True); time.sleep(300)"
)


def wait_for(check, timeout: float = 20) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.1)


def test_spawn_running_listens_and_stop_part(tmp_path: Path) -> None:
    port = free_port()
    pid = spawn_part(tmp_path, "web", [sys.executable, "-c", SERVE_HTTP, str(port)])
    try:
        assert running_part(tmp_path, "web") == pid
        recorded = (tmp_path / "pids" / "web.pid").read_text().split()
        assert recorded[0] == str(pid)
        assert len(recorded) == 2  # and its start time: a reused pid is not the part
        wait_for(lambda: part_listens(tmp_path, "web", port=port))
        assert not part_listens(tmp_path, "web", port=free_port())
        assert "--- elice stack: starting web at" in part_log(tmp_path, "web").read_text()
    finally:
        assert stop_part(tmp_path, "web")
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    assert running_part(tmp_path, "web") is None
    assert not part_listens(tmp_path, "web", port=port)
    assert stop_part(tmp_path, "web") is False


def test_a_pid_file_of_a_process_that_is_not_the_part_is_ignored(tmp_path: Path) -> None:
    other = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "pids").mkdir()
        (tmp_path / "pids" / "web.pid").write_text(f"{other.pid} 1\n")  # another start time
        assert running_part(tmp_path, "web") is None
        assert stop_part(tmp_path, "web") is False
        assert other.poll() is None  # not ours: left alone
    finally:
        other.kill()
        other.wait()


def test_part_listens_on_a_unix_socket_only_for_the_process_holding_it(tmp_path: Path) -> None:
    sock = tmp_path / "engine.sock"
    spawn_part(tmp_path, "engine", [sys.executable, "-c", SERVE_UNIX, str(sock)])
    spawn_part(tmp_path, "decoy", ["sleep", "60"])
    try:
        wait_for(lambda: part_listens(tmp_path, "engine", socket_path=sock))
        assert not part_listens(tmp_path, "decoy", socket_path=sock)
        assert not part_listens(tmp_path, "engine", socket_path=tmp_path / "other.sock")
    finally:
        assert sorted(stop_stack(tmp_path)) == ["decoy", "engine"]

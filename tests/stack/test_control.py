"""The local stack for real: engine, registry, base image, Prefect server, a running image."""

from __future__ import annotations

import io
import re
import shutil
import tempfile
import time
from pathlib import Path

import docker
import httpx
import pytest
from rich.console import Console
from typer.testing import CliRunner

from blocks.stack import StackInfo, load_stack_info
from cicd.stack_cli import StepPrinter, app
from core.records import ImageRef
from stack.control import ensure_stack, stack_status, stop_stack
from stack.engine import ensure_engine, registries_conf, storage_mounts
from stack.images import debian_mirror
from stack.ports import free_port
from stack.steps import StackStep, Steps


def _pids(root: Path) -> dict[str, str]:
    return {p.stem: p.read_text() for p in (root / "pids").glob("*.pid")}


def test_ensure_stack_is_idempotent(stack: StackInfo) -> None:
    root = Path(stack.docker_host.removeprefix("unix://")).parent
    before = _pids(root)
    again = ensure_stack(root=root)
    assert again == stack
    assert _pids(root) == before  # nothing restarted
    assert load_stack_info(root) == stack
    parts = {p.name: p for p in stack_status(root)}
    assert parts["engine"].state == "running"
    assert parts["engine"].address == stack.docker_host
    assert parts["registry"].state == "running"
    assert parts["registry"].address == stack.registry
    assert parts["base-image"].state == "present"


def test_second_stack_on_an_external_engine_with_prefect(
    stack: StackInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", stack.docker_host)
    info = ensure_stack(prefect=True, root=tmp_path)
    try:
        assert info.docker_host == stack.docker_host
        assert info.registry != stack.registry
        assert info.prefect_api_url
        assert httpx.get(f"{info.prefect_api_url}/health", timeout=10).status_code == 200
        assert httpx.get(f"http://{info.registry}/v2/", timeout=10).status_code == 200
        parts = {p.name: (p.state, p.address) for p in stack_status(tmp_path)}
        assert parts == {
            "engine": ("external", stack.docker_host),
            "registry": ("running", info.registry),
            "base-image": ("present", stack.base_image),
            "prefect": ("running", info.prefect_api_url),
        }
        assert ensure_stack(root=tmp_path) == info  # prefect kept, not restarted
        monkeypatch.setenv("ELICE_STACK_DIR", str(tmp_path))
        result = CliRunner().invoke(app, ["status"])
        assert result.exit_code == 0, result.output
        assert info.registry in result.output
        assert "external" in result.output
    finally:
        assert sorted(stop_stack(tmp_path)) == ["prefect", "registry"]
    parts = {p.name: p.state for p in stack_status(tmp_path)}
    assert parts["registry"] == "stopped"
    assert parts["prefect"] == "stopped"
    assert parts["engine"] == "external"  # not ours to stop
    assert stop_stack(tmp_path) == []


def test_container_from_the_pushed_image_answers_health(
    pushed_image: ImageRef, docker_client: docker.DockerClient
) -> None:
    port = free_port()
    container = docker_client.containers.run(
        pushed_image.reference,
        detach=True,
        network_mode="host",
        environment={"PORT": str(port), "SERVICE_NAME": pushed_image.service},
    )
    try:
        deadline = time.monotonic() + 90
        answer = None
        while time.monotonic() < deadline:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                if answer.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            container.reload()
            assert container.status == "running", container.logs().decode()[-2000:]
            time.sleep(0.5)
        assert answer is not None
        assert answer.status_code == 200, container.logs().decode()[-2000:]
    finally:
        container.remove(force=True)


def test_debian_mirror_and_registries_conf(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n"
    )
    assert debian_mirror(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list").write_text(
        "deb [arch=amd64] http://other.example/debian/ bookworm main\n"
    )
    assert debian_mirror(tmp_path) == "http://other.example/debian/"
    conf = registries_conf("127.0.0.1:5123")
    assert 'location = "127.0.0.1:5123"\ninsecure = true' in conf


def test_stack_up_says_what_it_starts_with_timings(
    stack: StackInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", stack.docker_host)
    monkeypatch.setenv("ELICE_STACK_DIR", str(tmp_path))
    try:
        first = CliRunner().invoke(app, ["up", "--no-prefect"])
        assert first.exit_code == 0, first.output
        lines = first.output.splitlines()
        info = load_stack_info(tmp_path)
        assert info is not None
        # not a terminal: plain lines, as each step starts and when it ends
        start = next(
            i
            for i, line in enumerate(lines)
            if line.startswith(f"registry: starting docker-registry on {info.registry}")
            and line.endswith(" ...")
        )
        ready = next(
            i for i, line in enumerate(lines) if re.fullmatch(r"registry: ready in \d+\.\ds", line)
        )
        assert start < ready
        assert f"engine: using DOCKER_HOST={stack.docker_host}" in lines
        assert f"base-image: {stack.base_image} present" in lines

        again = CliRunner().invoke(app, ["up", "--no-prefect"])
        assert again.exit_code == 0, again.output
        assert f"registry: running at {info.registry} (pid " in again.output
        assert "starting" not in again.output
    finally:
        stop_stack(tmp_path)


def test_step_printer_spins_on_a_terminal_and_prints_plain_lines_otherwise() -> None:
    steps = [
        StackStep(part="engine", state="start", text="starting podman API service"),
        StackStep(part="engine", state="done", text="ready", seconds=1.23),
        StackStep(part="prefect", state="start", text="starting Prefect server"),
        StackStep(part="prefect", state="failed", text="failed", seconds=4.0),
        StackStep(part="base-image", state="info", text="localhost/python-base:3.11 present"),
    ]
    plain = io.StringIO()
    printer = StepPrinter(Console(file=plain, width=40))
    for step in steps:
        printer(step)
    assert plain.getvalue().splitlines() == [
        "engine: starting podman API service ...",
        "engine: ready in 1.2s",
        "prefect: starting Prefect server ...",
        "prefect: failed after 4.0s",
        "base-image: localhost/python-base:3.11 present",
    ]
    terminal = io.StringIO()
    printer = StepPrinter(Console(file=terminal, force_terminal=True, width=120))
    for step in steps:
        printer(step)
    printer.close()
    text = terminal.getvalue()
    assert "engine: starting podman API service ... ready in 1.2s" in text
    assert "prefect: starting Prefect server ... failed after 4.0s" in text


@pytest.mark.stack
def test_stack_down_leaves_a_directory_that_can_be_removed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 20: after `cicd stack down`, Podman's overlay driver still held its bind mount
    of the stack's storage, so removing the stack's directory failed ("Device or resource
    busy"). A stack of its own engine (no DOCKER_HOST), stopped through the command line;
    in a short directory (podman refuses a runroot of more than 50 characters)."""
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    home = Path(tempfile.mkdtemp(prefix="down-", dir="/tmp"))
    monkeypatch.setenv("ELICE_STACK_DIR", str(home))
    try:
        ensure_engine(home, "127.0.0.1:5999", Steps(None))
        storage = home / "podman" / "root" / "overlay"
        assert storage in storage_mounts(home)  # the driver's mount is there while it runs
        result = CliRunner().invoke(app, ["down"])
        assert result.exit_code == 0, result.output
        assert "engine" in result.output
        assert storage_mounts(home) == []
        shutil.rmtree(home)  # raised OSError (EBUSY) before
        assert not home.exists()
    finally:
        if home.exists():
            stop_stack(home)

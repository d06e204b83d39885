"""`cicd stack status` as a user runs it (the installed console script): the stack's
parts from its record, pid files, sockets and their own answers, without importing Prefect
(nor the docker client or httpx), with the table and exit code of the full command line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from blocks.stack import StackInfo
from stack.status import stack_status

CICD = Path(sys.executable).with_name("cicd")
HEAVY = ("prefect", "prefect_aws", "prefect_kubernetes", "kubernetes_asyncio", "boto3", "docker")
LIGHT_ONLY = (*HEAVY, "httpx")
PROBE = (
    "import sys\n"
    "sys.argv = ['cicd', 'stack', 'status']\n"
    "from cicd.entry import main\n"
    "code = 0\n"
    "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\n"
    f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {LIGHT_ONLY!r})\n"
    "print('HEAVY', heavy, 'EXIT', code, file=sys.stderr)\n"
)
FULL = "import sys\nsys.argv = ['cicd', 'stack', 'status']\nfrom cicd.cli import app\napp()\n"


def _user_env(stack_dir: Path) -> dict[str, str]:
    """A user's shell for the stack at `stack_dir`: its own engine (no DOCKER_HOST)."""
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
    env.update(ELICE_STACK_DIR=str(stack_dir), COLUMNS="200")
    return env


def _run(args: list[str], stack_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        env=_user_env(stack_dir),
        cwd=stack_dir.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _states(table: str) -> dict[str, str]:
    """part -> state, from the printed table's rows (the header's left out)."""
    rows = [re.split(r"\s*[│┃|]\s*", line.strip()) for line in table.splitlines()]
    return {c[1]: c[2] for c in rows if len(c) == 5 and c[0] == c[4] == "" and c[1] != "part"}


def test_a_stack_not_started_prints_what_the_full_command_prints_and_exits_1(
    tmp_path: Path,
) -> None:
    """Nothing recorded, nothing running: engine and registry down, so exit 1; the light
    entry's output is the full command line's (which imports Prefect), byte for byte."""
    home = tmp_path / "stack"
    light = _run([str(CICD), "stack", "status"], home)
    assert light.returncode == 1, light.stderr
    assert _states(light.stdout) == {
        "engine": "stopped",
        "registry": "stopped",
        "base-image": "missing",
        "prefect": "stopped",
    }
    assert f"unix://{home}/podman.sock" in light.stdout
    full = _run([sys.executable, "-c", FULL], home)
    assert (full.returncode, full.stdout) == (light.returncode, light.stdout)
    probe = _run([sys.executable, "-c", PROBE], home)
    assert "HEAVY [] EXIT 1" in probe.stderr, probe.stderr


def test_the_running_stack_from_the_console_script_without_prefect(
    stack: StackInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The suite's stack (engine, registry, base image up): every check runs (a ping and an
    image inspect over the engine's socket, the registry's /v2/), exit 0, the states the
    library reads, and no Prefect, docker client or httpx loaded."""
    home = Path(stack.docker_host.removeprefix("unix://")).parent
    done = _run([str(CICD), "stack", "status"], home)
    assert done.returncode == 0, done.stderr
    states = _states(done.stdout)
    assert states["engine"] == "running"
    assert states["registry"] == "running"
    assert states["base-image"] == "present"
    assert stack.registry in done.stdout
    monkeypatch.delenv("DOCKER_HOST", raising=False)  # as in the script's environment
    assert states == {p.name: p.state for p in stack_status(home)}
    probe = _run([sys.executable, "-c", PROBE], home)
    assert "HEAVY [] EXIT 0" in probe.stderr, probe.stderr

"""`cicd status` reading saved blocks from a real Prefect server behind an auth string, as
a user runs it: the stack's server with the stack's string, or a configured one; no
Prefect imported, a refused string named by its status and never printed."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

from blocks.config import save_as_blocks
from blocks.docker_target import DockerTarget
from blocks.stack import StackInfo, save_stack_info, stack_auth_file
from core.catalog import DOCKER_TARGET_BLOCK
from core.config import PipelineConfig
from tests.cicd.light_cli import heavy_of, probe_cicd, run_cicd
from tests.prefect_server import served_prefect

pytestmark = pytest.mark.slow

AUTH = "admin:" + secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, config: PipelineConfig) -> Iterator[str]:
    """A server behind AUTH, holding the configuration's blocks and a docker target."""
    with served_prefect(tmp_path_factory.mktemp("status-api"), auth=AUTH) as url:
        with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_API_AUTH_STRING: AUTH}):
            save_as_blocks(config)
            DockerTarget().save(DOCKER_TARGET_BLOCK, overwrite=True)
        yield url


def _user(tmp_path: Path, stack_api: str | None, **extra: str) -> dict[str, str]:
    """A user's shell: no Prefect settings but `extra`; a stack record naming `stack_api`."""
    stack = tmp_path / "stack"
    stack.mkdir(exist_ok=True)
    if stack_api is not None:
        info = StackInfo(
            docker_host="unix:///nonexistent.sock",
            registry="127.0.0.1:5000",
            base_image="localhost/python-base:3.11",
            prefect_api_url=stack_api,
        )
        save_stack_info(info, stack)
        stack_auth_file(stack).write_text(AUTH)
        stack_auth_file(stack).chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        ELICE_STATE_DIR=str(tmp_path / "state"),
        ELICE_STACK_DIR=str(stack),
        ELICE_CONFIG="",
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        **extra,
    )
    return env


def _status(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`cicd status --json ARGS` through the console script's entry, in a process that then
    names the heavy modules it imported (on stderr)."""
    return probe_cicd(env, "status", "--json", *args)


def test_saved_blocks_from_the_stacks_server_with_its_string(tmp_path: Path, server: str) -> None:
    done = _status(_user(tmp_path, server), "--config", "blocks", "--environment", "dev")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["service"] for r in rows][:2] == ["api-gateway", "auth"]
    assert {r["address"] for r in rows if r["service"] == "auth"} == {"http://127.0.0.1:18002"}
    assert heavy_of(done) == [], done.stderr
    script = run_cicd(_user(tmp_path, server), "status", "--json", "--config", "blocks")
    assert script.returncode == 0, script.stderr
    assert len(json.loads(script.stdout)) == 36


def test_a_configured_server_is_read_with_the_users_string(tmp_path: Path, server: str) -> None:
    env = _user(tmp_path, None, PREFECT_API_URL=server, PREFECT_API_AUTH_STRING=AUTH)
    done = _status(env, "--config", "blocks")
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)) == 36
    assert heavy_of(done) == [], done.stderr


def test_a_refused_string_is_named_by_its_status_and_never_printed(
    tmp_path: Path, server: str
) -> None:
    wrong = "admin:" + "w" * 43
    for args in ((), ("--config", "blocks")):  # the docker target's block, the configuration's
        done = _status(_user(tmp_path, server, PREFECT_API_AUTH_STRING=wrong), *args)
        assert done.returncode == 1, done.stdout
        assert "401" in done.stderr
        assert "w" * 43 not in done.stdout + done.stderr
        assert AUTH.split(":")[1] not in done.stdout + done.stderr


def test_saved_blocks_without_any_server_are_refused_with_exit_2(tmp_path: Path) -> None:
    done = _status(_user(tmp_path, None), "--config", "blocks")
    assert done.returncode == 2
    assert "no Prefect API" in done.stderr
    assert "cicd register-blocks" in done.stderr

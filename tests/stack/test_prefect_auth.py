"""The stack's Prefect auth string: made once, owner-only, reused, and sent only to the
stack's own server (a team's PREFECT_API_URL keeps the user's own credentials)."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import httpx
import pytest
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

from blocks.stack import StackInfo, load_stack_auth, save_stack_info, stack_auth_file
from cicd.common import api_settings
from stack.prefect_server import ensure_prefect, ensure_stack_auth
from stack.steps import Steps
from stack.supervisor import stop_part
from tasks.masking import scrub_masked

STACK_API = "http://127.0.0.1:4299/api"


def test_made_once_owner_only_and_masked(tmp_path: Path) -> None:
    auth = ensure_stack_auth(tmp_path)
    user, _, password = auth.partition(":")
    assert user == "admin"
    assert len(password) >= 40  # token_urlsafe(32)
    assert stat.S_IMODE(stack_auth_file(tmp_path).stat().st_mode) == 0o600
    assert ensure_stack_auth(tmp_path) == auth  # reused by the next `stack up`
    assert load_stack_auth(tmp_path) == auth
    header = base64.b64encode(auth.encode()).decode()
    scrubbed = scrub_masked(f"auth={auth} password={password} Basic {header}")
    assert password not in scrubbed
    assert header not in scrubbed
    assert ensure_stack_auth(tmp_path / "other") != auth  # each stack its own


def test_a_file_others_may_read_is_replaced(tmp_path: Path) -> None:
    auth = ensure_stack_auth(tmp_path)
    path = stack_auth_file(tmp_path)
    path.chmod(0o644)
    fresh = ensure_stack_auth(tmp_path)
    assert fresh != auth  # it may be known: the server restarts with a new one
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prefect-auth")]


@pytest.fixture
def stack_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ELICE_STACK_DIR", str(tmp_path))
    info = StackInfo(docker_host="unix:///x.sock", registry="127.0.0.1:5000", base_image="b")
    save_stack_info(info.model_copy(update={"prefect_api_url": STACK_API}), tmp_path)
    return tmp_path


def test_commands_send_it_to_the_stacks_server_only(stack_home: Path) -> None:
    auth = ensure_stack_auth(stack_home)
    with temporary_settings(updates=api_settings(STACK_API + "/")):
        assert PREFECT_API_URL.value() == STACK_API + "/"
        assert PREFECT_API_AUTH_STRING.value() == auth
    with temporary_settings(updates=api_settings("https://prefect.example/api")):
        assert PREFECT_API_AUTH_STRING.value() is None  # a team's server: not ours to send


def test_a_configured_auth_string_wins(stack_home: Path) -> None:
    ensure_stack_auth(stack_home)
    with temporary_settings(updates={PREFECT_API_AUTH_STRING: "team:configured-by-the-user"}):
        updates = api_settings(STACK_API)
        assert PREFECT_API_AUTH_STRING not in updates


@pytest.mark.slow  # two real Prefect servers start one after the other: 30-90 s
def test_a_server_running_with_another_string_is_restarted_with_the_stacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real server of a stack's own home (free loopback ports, not the shared stack's):
    reused while it runs with the stack's string, restarted when the string was replaced."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    old = ensure_stack_auth(tmp_path)
    said: list[str] = []
    steps = Steps(lambda step: said.append(step.text))
    url = ensure_prefect(tmp_path, None, steps, old)
    previous = StackInfo(docker_host="x", registry="y", base_image="z", prefect_api_url=url)
    try:
        assert ensure_prefect(tmp_path, previous, steps, old) == url
        assert any(text.startswith("running at") for text in said)
        stack_auth_file(tmp_path).chmod(0o640)
        new = ensure_stack_auth(tmp_path)
        url = ensure_prefect(tmp_path, previous, steps, new)
        assert "running without the stack's auth string: restarting" in said
        filter_url = f"{url}/deployments/filter"
        user, _, password = new.partition(":")
        assert httpx.post(filter_url, json={}, auth=(user, password), timeout=30).is_success
        stale = httpx.post(filter_url, json={}, auth=(user, old.partition(":")[2]), timeout=30)
        assert stale.status_code == 401
    finally:
        stop_part(tmp_path, "prefect")

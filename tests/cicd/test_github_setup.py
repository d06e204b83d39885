"""`cicd github setup` against the local GitHub server: from nothing, then again."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.blocks.system import Secret
from prefect.settings import PREFECT_API_AUTH_STRING, temporary_settings
from pydantic import SecretStr
from typer.testing import CliRunner

from blocks.github import GITHUB_BLOCK, GitHubRepository
from cicd.cli import app
from tasks.github.statuses import REQUIRED_CONTEXTS
from tests.plugins.github import GitHubServer, github_server

runner = CliRunner()
AUTH = "elice:auth-string-for-the-workflow-1f2e3d"
PUBLISHED = "https://prefect.example.com/api"


@pytest.fixture
def server() -> Iterator[GitHubServer]:
    with github_server() as running:
        yield running


@pytest.fixture
def configured(server: GitHubServer) -> Iterator[GitHubServer]:
    GitHubRepository(
        repository=server.repository,
        token=SecretStr(server.token),
        api_url=server.url,
        retry_backoff_s=0.05,
    ).save(GITHUB_BLOCK, overwrite=True)
    yield server
    GitHubRepository.delete(GITHUB_BLOCK)


@pytest.fixture
def promote_key(tmp_path: Path) -> Path:
    key = tmp_path / "promote"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "github-actions", "-f", str(key)],
        check=True,
    )
    return key


def _setup(*args: str) -> tuple[int, str]:
    with temporary_settings(updates={PREFECT_API_AUTH_STRING: AUTH}):
        result = runner.invoke(app, ["github", "setup", "--prefect-api-url", PUBLISHED, *args])
    return result.exit_code, result.output


def test_setup_from_nothing_then_again_changes_nothing(
    configured: GitHubServer, promote_key: Path
) -> None:
    server = configured
    code, dry = _setup("--dry-run", "--promote-key", str(promote_key))
    assert code == 0, dry
    assert "+ create branch protection main" in dry
    assert "+ create environment staging" in dry
    assert "+ create environment production" in dry
    assert "+ create secret PREFECT_API_URL" in dry
    assert "+ create secret staging/ELICE_PROMOTE_KEY" in dry
    assert "+ create secret production/ELICE_PROMOTE_KEY" in dry
    assert "dry run: 7 changes planned, nothing changed" in dry
    assert server.writes() == []

    code, out = _setup("--promote-key", str(promote_key))
    assert code == 0, out
    assert "7 changes made" in out
    protection = server.state.protection["main"]
    assert protection["required_status_checks"]["contexts"] == sorted(REQUIRED_CONTEXTS)
    assert protection["required_status_checks"]["strict"] is True
    assert protection["required_pull_request_reviews"]["required_approving_review_count"] == 1
    assert protection["enforce_admins"]["enabled"] is True
    assert protection["allow_force_pushes"]["enabled"] is False
    assert protection["allow_deletions"]["enabled"] is False
    assert set(server.state.environments) == {"staging", "production"}
    # decrypted with the server's private key: what was sealed is what was meant
    assert server.secret_value("PREFECT_API_URL") == PUBLISHED
    assert server.secret_value("PREFECT_API_AUTH_STRING") == AUTH
    for env in ("staging", "production"):  # each environment's own, sealed to its own key
        assert server.secret_value("ELICE_PROMOTE_KEY", env) == promote_key.read_text()
    assert "ELICE_PROMOTE_KEY" not in server.secrets()  # never readable by a pull request
    assert AUTH not in out
    assert "PRIVATE KEY" not in out
    for put in server.requests_to("PUT", "/actions/secrets/PREFECT_API_AUTH_STRING"):
        assert AUTH not in str(put.json)

    writes = len(server.writes())
    code, again = _setup("--promote-key", str(promote_key))
    assert code == 0, again
    assert again.strip().endswith("nothing to change")
    assert len(server.writes()) == writes


def test_what_changed_on_github_since_is_put_back_and_the_team_s_additions_kept(
    configured: GitHubServer,
) -> None:
    server = configured
    assert _setup()[0] == 0
    protection = server.state.protection["main"]
    protection["allow_force_pushes"]["enabled"] = True
    protection["required_status_checks"]["contexts"].append("ci (Prefect flow ci/ci)")
    protection["required_pull_request_reviews"]["required_approving_review_count"] = 2
    server.secrets()["PREFECT_API_URL"]["updated_at"] = "2030-01-01T00:00:00Z"
    server.rotate_key()

    code, out = _setup("--dry-run")
    assert code == 0, out
    assert "~ update branch protection main: force pushes: True -> False" in out
    assert "~ update secret PREFECT_API_URL" in out
    assert "PREFECT_API_AUTH_STRING" not in out.split("GitHub")[1].split("dry run")[0]

    code, out = _setup()
    assert code == 0, out
    protection = server.state.protection["main"]
    assert protection["allow_force_pushes"]["enabled"] is False
    assert "ci (Prefect flow ci/ci)" in protection["required_status_checks"]["contexts"]
    assert protection["required_pull_request_reviews"]["required_approving_review_count"] == 2
    assert server.secret_value("PREFECT_API_URL") == PUBLISHED  # sealed to the new key
    assert _setup()[1].strip().endswith("nothing to change")


def test_an_admin_token_from_a_secret_block_is_used_and_never_shown(
    configured: GitHubServer,
) -> None:
    server = configured
    admin = "ghp_admin_token_for_setup_only_9a8b7c"
    server.token = admin  # the block's own (pipeline) token is now refused
    Secret(value=admin).save("elice-github-admin", overwrite=True)
    code, out = _setup("--token-block", "elice-github-admin")
    assert code == 0, out
    assert admin not in out
    assert all(r.headers["authorization"] == f"token {admin}" for r in server.requests)


def test_without_the_block_setup_says_what_to_save_and_calls_nothing(server: GitHubServer) -> None:
    code, out = _setup()
    assert code == 2
    assert f"save a GitHubRepository block named {GITHUB_BLOCK}" in out
    assert server.requests == []


def test_a_promote_key_that_is_no_key_is_refused_before_any_call(
    configured: GitHubServer, tmp_path: Path
) -> None:
    bogus = tmp_path / "key.pub"
    bogus.write_text("ssh-ed25519 AAAA... github-actions\n")
    code, out = _setup("--promote-key", str(bogus))
    assert code == 2
    assert "not a private key" in out
    assert configured.requests == []


def test_a_prefect_api_url_that_is_no_url_is_refused_before_any_call(
    configured: GitHubServer,
) -> None:
    result = runner.invoke(app, ["github", "setup", "--prefect-api-url", "prefect:4200"])
    assert result.exit_code == 2
    assert "--prefect-api-url must be an http(s) URL, got 'prefect:4200'" in result.output
    assert configured.requests == []


def test_a_refused_token_fails_before_any_change(configured: GitHubServer) -> None:
    configured.token = "another"
    code, out = _setup()
    assert code == 2
    assert "HTTP 401: Bad credentials" in out
    assert configured.writes() == []


def test_github_down_part_way_exits_1_and_the_next_run_finishes(
    configured: GitHubServer,
) -> None:
    server = configured
    reads = 3  # protection, environments, secrets
    server.down = False
    original = server._route

    def fail_after_two_writes(method, path, query, payload):  # type: ignore[no-untyped-def]
        if method != "GET" and len(server.writes()) == 2:
            server.down = True  # from the next request on
        return original(method, path, query, payload)

    server._route = fail_after_two_writes  # type: ignore[method-assign]
    code, out = _setup()
    assert code == 1, out
    assert "done: create branch protection main" in out
    assert "done: create environment staging" in out
    assert "HTTP 503" in out
    assert len(server.requests) >= reads
    server._route = original  # type: ignore[method-assign]
    server.down = False
    code, out = _setup()
    assert code == 0, out
    assert "branch protection" not in out
    assert "environment staging" not in out
    assert "+ create environment production" in out
    assert _setup()[1].strip().endswith("nothing to change")

"""The GitHub client against the local GitHub server: auth, pagination, limits, outages."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from blocks.github import GitHubRepository
from tasks.github.client import (
    ATTEMPTS,
    GitHubRefused,
    GitHubUnavailable,
    call,
    collect,
    github_client,
)
from tests.plugins.github import GitHubServer, github_server

SHA = "a" * 40


@pytest.fixture
def server() -> Iterator[GitHubServer]:
    with github_server(limit=1000) as running:
        yield running


def _repo(server: GitHubServer, **overrides: object) -> GitHubRepository:
    fields: dict[str, object] = {
        "repository": server.repository,
        "token": SecretStr(server.token),
        "api_url": server.url,
        "retry_backoff_s": 0.05,
        "max_wait_s": 5,
    }
    fields.update(overrides)
    return GitHubRepository(**fields)  # type: ignore[arg-type]


def _status(gh: object, context: str = "elice/checks") -> object:
    return call(
        "status",
        gh.rest.repos.create_commit_status,  # type: ignore[attr-defined]
        "elice",
        "monorepo",
        SHA,
        state="success",
        context=context,
    )


def test_a_call_sends_the_token_and_returns_github_s_json(server: GitHubServer) -> None:
    gh = github_client(_repo(server))
    body = _status(gh)
    assert body["state"] == "success"  # type: ignore[index]
    assert body["context"] == "elice/checks"  # type: ignore[index]
    (sent,) = server.requests_to("POST", f"/statuses/{SHA}")
    assert sent.headers["authorization"] == f"token {server.token}"
    assert server.statuses_for(SHA)[0]["state"] == "success"


def test_an_enterprise_api_root_is_used_as_configured(server: GitHubServer) -> None:
    gh = github_client(_repo(server, api_url=server.enterprise_url + "/"))
    _status(gh)
    assert server.statuses_for(SHA)


def test_a_list_is_read_through_every_page_by_its_link_headers(server: GitHubServer) -> None:
    gh = github_client(_repo(server))
    for n in range(230):
        server.state.statuses.append({"sha": SHA, "context": f"c{n}", "state": "success"})
    statuses = collect(
        gh,
        "statuses",
        gh.rest.repos.list_commit_statuses_for_ref,
        None,
        owner="elice",
        repo="monorepo",
        ref=SHA,
    )
    assert len(statuses) == 230
    pages = server.requests_to("GET", f"/commits/{SHA}/statuses")
    assert [r.query.get("page", "1") for r in pages] == ["1", "2", "3"]


def test_a_secondary_rate_limit_is_waited_out_as_retry_after_says(server: GitHubServer) -> None:
    gh = github_client(_repo(server))
    server.secondary_limit(2, retry_after=1)
    started = time.monotonic()
    _status(gh)
    assert time.monotonic() - started >= 2
    assert len(server.requests_to("POST")) == 3
    assert server.statuses_for(SHA)


def test_a_spent_primary_limit_that_resets_later_than_we_wait_fails_at_once() -> None:
    with github_server(limit=2) as server:
        gh = github_client(_repo(server))
        _status(gh)
        _status(gh)
        started = time.monotonic()
        with pytest.raises(GitHubUnavailable, match="rate limited for another"):
            _status(gh)
        assert time.monotonic() - started < 2
        assert len(server.statuses_for(SHA)) == 2


def test_a_short_outage_is_retried_with_backoff(server: GitHubServer) -> None:
    gh = github_client(_repo(server))
    server.outage(ATTEMPTS - 1, status=502)
    _status(gh)
    assert len(server.requests_to("POST")) == ATTEMPTS
    assert server.statuses_for(SHA)


def test_a_longer_outage_fails_after_the_attempts_naming_the_call(server: GitHubServer) -> None:
    gh = github_client(_repo(server))
    server.down = True
    with pytest.raises(GitHubUnavailable, match=r"GitHub status: HTTP 503"):
        _status(gh)
    assert len(server.requests_to("POST")) == ATTEMPTS


def test_an_unreachable_server_is_retried_then_reported() -> None:
    with github_server() as server:
        repo = _repo(server)
    gh = github_client(repo)
    with pytest.raises(GitHubUnavailable, match="GitHub status"):
        _status(gh)


def test_a_refused_token_is_a_4xx_error_without_the_token(
    server: GitHubServer, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "ghp_wrong_token_value_123456"
    gh = github_client(_repo(server, token=SecretStr(secret)))
    with caplog.at_level(logging.DEBUG), pytest.raises(GitHubRefused) as caught:
        _status(gh)
    assert caught.value.status == 401
    assert "Bad credentials" in str(caught.value)
    assert len(server.requests_to("POST")) == 1  # a 4xx is not retried
    assert secret not in str(caught.value)
    assert secret not in caplog.text


def test_a_bad_body_is_refused_with_github_s_validation_errors(server: GitHubServer) -> None:
    gh = github_client(_repo(server))
    with pytest.raises(GitHubRefused, match="Validation Failed"):
        call(
            "status",
            gh.rest.repos.create_commit_status,
            "elice",
            "monorepo",
            SHA,
            state="failure",
            description="x" * 141,
        )

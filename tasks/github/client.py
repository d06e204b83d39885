"""The one way the pipeline talks to GitHub's REST API: githubkit, made patient and quiet.

    github_client(repo)          a client for the block's API URL and token
    GitHubCall(...)(what, f, ..) one REST call: retried where a retry can help, else a
                                 GitHubUnavailable / GitHubRefused naming what failed

GitHub is asked as its documentation says: one request at a time per client, a rate
limit's Retry-After (secondary limits) or x-ratelimit-reset (primary) waited out when it
is at most the block's `max_wait_s`, 5xx answers and unreachable servers retried with
exponential backoff. What still fails is raised with GitHub's message, the token scrubbed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ParamSpec, TypeVar

from githubkit import GitHub, TokenAuthStrategy
from githubkit.exception import GitHubException, RateLimitExceeded, RequestError, RequestFailed
from githubkit.response import Response
from githubkit.retry import RetryOption
from githubkit.throttling import LocalThrottler

from blocks.github import GitHubRepository
from core.errors import PipelineError, ToolError
from tasks.masking import mask, scrub_masked
from tasks.process import run_logger

P = ParamSpec("P")
T = TypeVar("T")

ATTEMPTS = 4
"""Tries of one call before it counts as failed (GitHub's own clients retry 3 times)."""
TIMEOUT_S = 15.0


class GitHubUnavailable(ToolError):
    """GitHub could not be reached, answered 5xx, or rate-limits longer than we wait."""


class GitHubRefused(PipelineError):
    """GitHub answered a call with a 4xx: bad credentials, no permission, bad request."""

    def __init__(self, message: str, status: int) -> None:
        self.status = status
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.status))


@dataclass(frozen=True)
class Patience:
    """githubkit's retry decision: what to retry, and how long to wait before it."""

    backoff_s: float
    max_wait_s: float
    attempts: int = ATTEMPTS

    def __call__(self, exc: GitHubException, retry_count: int) -> RetryOption:
        if retry_count >= self.attempts - 1:
            return RetryOption(False)
        if isinstance(exc, RateLimitExceeded):
            wait = max(exc.retry_after.total_seconds(), 0.0)
            if wait > self.max_wait_s:
                return RetryOption(False)
            what = f"rate limited ({exc.response.status_code})"
        elif isinstance(exc, RequestFailed):
            if exc.response.status_code < 500:
                return RetryOption(False)
            wait, what = self.backoff_s * 2**retry_count, f"HTTP {exc.response.status_code}"
        elif isinstance(exc, RequestError):
            wait, what = self.backoff_s * 2**retry_count, "unreachable"
        else:
            return RetryOption(False)
        run_logger().warning("GitHub: %s; retrying in %.1fs", what, wait)
        # githubkit waits 60 s for a zero timedelta: never hand it one.
        return RetryOption(True, timedelta(seconds=max(wait, 0.01)))


def github_client(repo: GitHubRepository) -> GitHub[TokenAuthStrategy]:
    """A client for `repo`'s API URL and token: patient, uncached, one request at a time."""
    token = repo.token.get_secret_value()
    mask(token)
    return GitHub(
        TokenAuthStrategy(token),
        base_url=repo.api_url + "/",
        user_agent="elice-devops",
        timeout=TIMEOUT_S,
        http_cache=False,
        throttler=LocalThrottler(1),
        auto_retry=Patience(repo.retry_backoff_s, repo.max_wait_s),
    )


def _message(response: Response[Any]) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if not isinstance(body, dict):
        return str(body)[:200]
    detail = body.get("message", "")
    errors = body.get("errors")
    return f"{detail} {errors}" if errors else str(detail)


@contextmanager
def translated(what: str) -> Iterator[None]:
    """githubkit's errors inside as the pipeline's, `what` naming the call, the token scrubbed.

    Raises:
        GitHubUnavailable: unreachable, 5xx, or rate-limited beyond patience, after retries.
        GitHubRefused: a 4xx answer (its status and GitHub's message).
    """
    try:
        yield
    except RateLimitExceeded as exc:
        wait = exc.retry_after.total_seconds()
        msg = f"GitHub {what}: rate limited for another {wait:.0f}s"
        raise GitHubUnavailable(msg) from exc
    except RequestFailed as exc:
        status = exc.response.status_code
        text = scrub_masked(f"GitHub {what}: HTTP {status}: {_message(exc.response)}")
        if status >= 500:
            raise GitHubUnavailable(text) from exc
        raise GitHubRefused(text, status) from exc
    except GitHubException as exc:
        msg = scrub_masked(f"GitHub {what}: {exc}")
        raise GitHubUnavailable(msg) from exc


def call(what: str, request: Callable[P, Response[T]], *args: P.args, **kwargs: P.kwargs) -> Any:
    """`request(*args, **kwargs)`'s JSON body (None when empty); errors as `translated`."""
    with translated(what):
        response = request(*args, **kwargs)
    return response.json() if response.content else None


def collect(
    gh: GitHub[Any],
    what: str,
    request: Callable[..., Response[Any]],
    key: str | None,
    **kwargs: Any,
) -> list[Any]:
    """Every item of a paginated list (following its Link headers), as JSON.

    `key`: the list's field in each page's body (`secrets`, `environments`), None for a
    page that is the list itself. Errors as `translated`.
    """

    def items(response: Response[Any]) -> list[Any]:
        body = response.json()
        return list(body[key] if key is not None else body)

    with translated(what):
        return list(gh.rest.paginate(request, map_func=items, per_page=100, **kwargs))

"""A local server that answers as GitHub's REST API does, for one repository.

`GitHubServer(repository="elice/monorepo", token="...")` is a real HTTP server on
127.0.0.1 (a free port) in a background thread; `.url` is its API root, and the same
routes answer under `/api/v3` (`.enterprise_url`, as GitHub Enterprise Server serves them).
It records every request and holds the repository's state:

    commit statuses        POST /repos/{o}/{r}/statuses/{sha}; GET .../commits/{ref}/statuses,
                           .../commits/{ref}/status (combined)
    deployments            POST/GET /repos/{o}/{r}/deployments (environment, ref, sha filters),
                           GET .../deployments/{id}, POST/GET .../deployments/{id}/statuses
                           (auto_inactive as GitHub applies it)
    issue comments         GET/POST /repos/{o}/{r}/issues/{n}/comments (open pull requests
                           only), PATCH /repos/{o}/{r}/issues/comments/{id}
    branch protection      GET/PUT /repos/{o}/{r}/branches/{branch}/protection
    environments           GET /repos/{o}/{r}/environments, GET/PUT .../environments/{name}
    actions secrets        GET .../actions/secrets/public-key, GET .../actions/secrets[/{name}],
                           PUT .../actions/secrets/{name}, and the same under
                           .../environments/{name}/secrets: sealed boxes opened with the
                           scope's private key (`.secret_value(name, environment)`), a
                           stale key_id 422
    rate limit             GET /rate_limit; every answer carries x-ratelimit-* headers

As GitHub: `Authorization: token|Bearer <token>` or 401 "Bad credentials"; 404 for another
repository or an unknown route; 422 with `errors` for a bad body; lists paginated by
`per_page` (default 30, at most 100) and `page`, with a `Link` header (next, last, first,
prev); the primary limit (`limit` requests per window) answers 403 with
`x-ratelimit-remaining: 0` once spent. On demand:

    server.secondary_limit(n, retry_after=1)   the next n requests: 403 + Retry-After
    server.outage(n, status=502)               the next n requests: a 5xx page
    server.down = True                         every request: 503 until set False
    server.requests / requests_to(method, path_suffix)   what arrived (`Recorded`)
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from nacl.public import PrivateKey, SealedBox

_ENV = r"/environments/(?P<env>[^/]+)"
STATUS_STATES = {"error", "failure", "pending", "success"}
DEPLOYMENT_STATES = {
    "error",
    "failure",
    "inactive",
    "in_progress",
    "queued",
    "pending",
    "success",
}


@dataclass(frozen=True)
class Recorded:
    """One request as the server saw it (header names lower-case)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any


@dataclass
class Answer:
    """One answer: status, JSON body (None: no body), extra headers."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


class ApiError(Exception):
    """Raised by a route: answered as GitHub's error body."""

    def __init__(self, status: int, message: str, errors: list[Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


BOT = {
    "login": "elice-bot",
    "id": 1,
    "node_id": "MDQ6VXNlcjE=",
    "avatar_url": "https://avatars.example/u/1",
    "gravatar_id": "",
    "url": "https://api.github.com/users/elice-bot",
    "html_url": "https://github.com/elice-bot",
    "followers_url": "",
    "following_url": "",
    "gists_url": "",
    "starred_url": "",
    "subscriptions_url": "",
    "organizations_url": "",
    "repos_url": "",
    "events_url": "",
    "received_events_url": "",
    "type": "Bot",
    "site_admin": False,
}


@dataclass
class RepoState:
    """Everything the server holds for its one repository."""

    branches: set[str] = field(default_factory=lambda: {"main"})
    pulls: dict[int, str] = field(default_factory=dict)  # number -> head sha
    statuses: list[dict[str, Any]] = field(default_factory=list)
    deployments: list[dict[str, Any]] = field(default_factory=list)
    deployment_statuses: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    comments: list[dict[str, Any]] = field(default_factory=list)
    protection: dict[str, dict[str, Any]] = field(default_factory=dict)
    environments: dict[str, dict[str, Any]] = field(default_factory=dict)
    secrets: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """scope ("" for the repository, else an environment's name) -> name -> metadata"""
    secret_values: dict[str, dict[str, str]] = field(default_factory=dict)


class GitHubServer:
    """A recording GitHub REST API for one repository; see the module docstring."""

    def __init__(
        self, repository: str = "elice/monorepo", token: str = "ghs-test-token", limit: int = 5000
    ) -> None:
        self.repository = repository
        self.token = token
        self.limit = limit
        self.state = RepoState()
        self.down = False
        self._lock = threading.RLock()
        self._requests: list[Recorded] = []
        self._ids = itertools.count(1000)
        self._used = 0
        self._reset = int(time.time()) + 3600
        self._faults: list[Answer] = []
        self._keys: dict[str, tuple[PrivateKey, str]] = {}
        self._routes = self._route_table()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.enterprise_url = f"{self.url}/api/v3"

    # --- lifecycle and test controls -------------------------------------------------

    def start(self) -> GitHubServer:
        """Serve in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def secondary_limit(self, count: int, retry_after: int = 1) -> None:
        """The next `count` requests hit a secondary rate limit (403 with Retry-After)."""
        body = {
            "message": "You have exceeded a secondary rate limit. Please wait a few minutes.",
            "documentation_url": "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api",
        }
        with self._lock:
            self._faults += [Answer(403, body, {"retry-after": str(retry_after)})] * count

    def outage(self, count: int, status: int = 502) -> None:
        """The next `count` requests get a 5xx page, as GitHub's edge answers in an outage."""
        with self._lock:
            self._faults += [Answer(status, {"message": "Server Error"})] * count

    def _key(self, scope: str) -> tuple[PrivateKey, str]:
        """The key pair of a scope ("" the repository's, else an environment's) and its id."""
        if scope not in self._keys:
            self._keys[scope] = (PrivateKey.generate(), str(568250167242549743 + len(self._keys)))
        return self._keys[scope]

    def rotate_key(self, scope: str = "") -> None:
        """A new public key of `scope` (secrets sealed to the old one are then refused)."""
        with self._lock:
            _, old = self._key(scope)
            self._keys[scope] = (PrivateKey.generate(), str(int(old) + 1000))

    def open_pull(self, number: int, head_sha: str) -> None:
        """A pull request `number` is open with head `head_sha`."""
        with self._lock:
            self.state.pulls[number] = head_sha

    def secret_value(self, name: str, environment: str = "") -> str:
        """What the last PUT of secret `name` (of `environment`) decrypted to with the
        private key."""
        with self._lock:
            return self.state.secret_values[environment][name]

    def secrets(self, environment: str = "") -> dict[str, dict[str, Any]]:
        """The secrets' metadata (of `environment`), by name."""
        with self._lock:
            return self.state.secrets.setdefault(environment, {})

    @property
    def requests(self) -> list[Recorded]:
        """Every request so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def requests_to(self, method: str, path_suffix: str = "") -> list[Recorded]:
        """Requests with `method` whose path ends with `path_suffix`."""
        return [r for r in self.requests if r.method == method and r.path.endswith(path_suffix)]

    def writes(self) -> list[Recorded]:
        """Every request that changes something (not GET)."""
        return [r for r in self.requests if r.method != "GET"]

    def statuses_for(self, sha: str) -> list[dict[str, Any]]:
        """The commit statuses of `sha`, oldest first."""
        with self._lock:
            return [s for s in self.state.statuses if s["sha"] == sha]

    def deployments(self, environment: str | None = None) -> list[dict[str, Any]]:
        """The deployments (of `environment`), oldest first."""
        with self._lock:
            return [
                d
                for d in self.state.deployments
                if environment is None or d["environment"] == environment
            ]

    def deployment_states(self, deployment_id: int) -> list[str]:
        """The states a deployment went through, oldest first."""
        with self._lock:
            return [s["state"] for s in self.state.deployment_statuses[deployment_id]]

    def deployment_statuses(self, deployment_id: int) -> list[dict[str, Any]]:
        """A deployment's statuses, oldest first."""
        with self._lock:
            return list(self.state.deployment_statuses[deployment_id])

    def comments(self, number: int) -> list[dict[str, Any]]:
        """The comments on issue or pull request `number`, oldest first."""
        with self._lock:
            return [c for c in self.state.comments if c["issue"] == number]

    # --- HTTP -----------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                host = self.headers.get("Host") or "127.0.0.1"
                answer = server._answer(self.command, self.path, dict(self.headers), body, host)
                data = b"" if answer.body is None else json.dumps(answer.body).encode()
                self.send_response(answer.status)
                if answer.body is not None:
                    self.send_header("Content-Type", "application/json; charset=utf-8")
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        return Handler

    def _answer(
        self, method: str, raw_path: str, headers: dict[str, str], body: bytes, host: str
    ) -> Answer:
        parts = urlsplit(raw_path)
        path = parts.path.removeprefix("/api/v3")
        lower = {k.lower(): v for k, v in headers.items()}
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = "not json"
        query = dict(parse_qsl(parts.query))
        with self._lock:
            self._requests.append(Recorded(method, path, query, lower, payload))
            answer = self._guarded(method, path, query, lower, payload)
            if answer.status < 500:
                answer.headers.update(self._limit_headers())
            link = answer.headers.pop("x-link-pages", None)
            if link is not None:
                answer.headers["Link"] = _links(host, parts.path, query, *map(int, link.split()))
            return answer

    def _limit_headers(self) -> dict[str, str]:
        return {
            "x-ratelimit-limit": str(self.limit),
            "x-ratelimit-remaining": str(max(self.limit - self._used, 0)),
            "x-ratelimit-used": str(min(self._used, self.limit)),
            "x-ratelimit-reset": str(self._reset),
            "x-ratelimit-resource": "core",
        }

    def _guarded(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str], payload: Any
    ) -> Answer:
        if self.down:
            return Answer(503, {"message": "Service Unavailable"})
        if self._faults:
            fault = self._faults.pop(0)
            return Answer(fault.status, fault.body, dict(fault.headers))
        auth = headers.get("authorization", "")
        if auth not in (f"token {self.token}", f"Bearer {self.token}"):
            return Answer(401, {"message": "Bad credentials"})
        if path != "/rate_limit":
            if self._used >= self.limit:
                message = "API rate limit exceeded for installation."
                return Answer(403, {"message": message})
            self._used += 1
        try:
            return self._route(method, path, query, payload)
        except ApiError as exc:
            error: dict[str, Any] = {"message": exc.message}
            if exc.errors is not None:
                error["errors"] = exc.errors
            return Answer(exc.status, error)

    def _route(self, method: str, path: str, query: dict[str, str], payload: Any) -> Answer:
        if path == "/rate_limit" and method == "GET":
            core = {
                "limit": self.limit,
                "remaining": max(self.limit - self._used, 0),
                "used": self._used,
                "reset": self._reset,
            }
            return Answer(200, {"resources": {"core": core}, "rate": core})
        prefix = f"/repos/{self.repository}"
        if not path.startswith(prefix):
            raise ApiError(404, "Not Found")
        rest = path.removeprefix(prefix) or "/"
        for (verb, pattern), handler in self._routes.items():
            match = re.fullmatch(pattern, rest)
            if match and verb == method:
                return handler(match.groupdict(), query, payload)
        raise ApiError(404, "Not Found")

    def _route_table(
        self,
    ) -> dict[tuple[str, str], Callable[[dict[str, str], dict[str, str], Any], Answer]]:
        return {
            ("GET", "/"): self._get_repo,
            ("POST", r"/statuses/(?P<sha>[0-9a-f]{40})"): self._post_status,
            ("GET", r"/commits/(?P<ref>[^/]+)/statuses"): self._list_statuses,
            ("GET", r"/commits/(?P<ref>[^/]+)/status"): self._combined_status,
            ("POST", "/deployments"): self._post_deployment,
            ("GET", "/deployments"): self._list_deployments,
            ("GET", r"/deployments/(?P<id>\d+)"): self._get_deployment,
            ("POST", r"/deployments/(?P<id>\d+)/statuses"): self._post_deployment_status,
            ("GET", r"/deployments/(?P<id>\d+)/statuses"): self._list_deployment_statuses,
            ("GET", r"/issues/(?P<number>\d+)/comments"): self._list_comments,
            ("POST", r"/issues/(?P<number>\d+)/comments"): self._post_comment,
            ("PATCH", r"/issues/comments/(?P<id>\d+)"): self._patch_comment,
            ("GET", r"/branches/(?P<branch>[^/]+)/protection"): self._get_protection,
            ("PUT", r"/branches/(?P<branch>[^/]+)/protection"): self._put_protection,
            ("GET", "/environments"): self._list_environments,
            ("GET", r"/environments/(?P<name>[^/]+)"): self._get_environment,
            ("PUT", r"/environments/(?P<name>[^/]+)"): self._put_environment,
            ("GET", "/actions/secrets/public-key"): self._public_key,
            ("GET", "/actions/secrets"): self._list_secrets,
            ("GET", r"/actions/secrets/(?P<name>[A-Za-z0-9_]+)"): self._get_secret,
            ("PUT", r"/actions/secrets/(?P<name>[A-Za-z0-9_]+)"): self._put_secret,
            ("GET", f"{_ENV}/secrets/public-key"): self._public_key,
            ("GET", f"{_ENV}/secrets"): self._list_secrets,
            ("GET", f"{_ENV}/secrets/(?P<name>[A-Za-z0-9_]+)"): self._get_secret,
            ("PUT", f"{_ENV}/secrets/(?P<name>[A-Za-z0-9_]+)"): self._put_secret,
        }

    # --- routes -----------------------------------------------------------------------

    def _api(self, *parts: object) -> str:
        return "/".join([f"{self.url}/repos/{self.repository}", *map(str, parts)])

    def _get_repo(self, _: dict[str, str], __: dict[str, str], ___: Any) -> Answer:
        name = self.repository.split("/")[1]
        return Answer(
            200,
            {"id": 1, "name": name, "full_name": self.repository, "default_branch": "main"},
        )

    def _post_status(self, args: dict[str, str], _: dict[str, str], body: Any) -> Answer:
        body = _object(body)
        state = body.get("state")
        if state not in STATUS_STATES:
            raise ApiError(422, "Validation Failed", [_invalid("Status", "state", state)])
        description = body.get("description") or ""
        if len(description) > 140:
            raise ApiError(422, "Validation Failed", [_invalid("Status", "description", "")])
        status = {
            "id": next(self._ids),
            "node_id": "S",
            "url": self._api("statuses", args["sha"]),
            "avatar_url": None,
            "sha": args["sha"],
            "state": state,
            "description": description or None,
            "target_url": body.get("target_url"),
            "context": body.get("context") or "default",
            "created_at": _now(),
            "updated_at": _now(),
            "creator": BOT,
        }
        self.state.statuses.append(status)
        return Answer(201, status)

    def _statuses_of(self, ref: str) -> list[dict[str, Any]]:
        sha = self.state.pulls.get(int(ref)) if ref.isdigit() and len(ref) < 40 else ref
        return [s for s in reversed(self.state.statuses) if s["sha"] == sha]

    def _list_statuses(self, args: dict[str, str], query: dict[str, str], _: Any) -> Answer:
        return _page(self._statuses_of(args["ref"]), query)

    def _combined_status(self, args: dict[str, str], _: dict[str, str], __: Any) -> Answer:
        latest: dict[str, dict[str, Any]] = {}
        for status in self._statuses_of(args["ref"]):
            latest.setdefault(status["context"], status)
        states = {s["state"] for s in latest.values()}
        combined = (
            "failure"
            if states & {"failure", "error"}
            else "pending"
            if "pending" in states or not states
            else "success"
        )
        body = {
            "state": combined,
            "sha": args["ref"],
            "total_count": len(latest),
            "statuses": list(latest.values()),
        }
        return Answer(200, body)

    def _post_deployment(self, _: dict[str, str], __: dict[str, str], body: Any) -> Answer:
        body = _object(body)
        ref = body.get("ref")
        if not isinstance(ref, str) or not ref:
            raise ApiError(422, "Validation Failed", [_invalid("Deployment", "ref", ref)])
        sha = ref if re.fullmatch(r"[0-9a-f]{40}", ref) else None
        if sha is None:
            raise ApiError(422, f"No ref found for: {ref}")
        self._check_contexts(sha, body.get("required_contexts"))
        deployment = {
            "id": next(self._ids),
            "node_id": "D",
            "url": self._api("deployments", "0"),
            "sha": sha,
            "ref": ref,
            "task": body.get("task") or "deploy",
            "payload": body.get("payload") or {},
            "original_environment": body.get("environment") or "production",
            "environment": body.get("environment") or "production",
            "description": body.get("description"),
            "creator": BOT,
            "created_at": _now(),
            "updated_at": _now(),
            "statuses_url": "",
            "repository_url": self._api(),
            "transient_environment": bool(body.get("transient_environment", False)),
            "production_environment": bool(
                body.get("production_environment", body.get("environment") == "production")
            ),
        }
        deployment["url"] = self._api("deployments", deployment["id"])
        deployment["statuses_url"] = deployment["url"] + "/statuses"
        self.state.deployments.append(deployment)
        self.state.deployment_statuses[deployment["id"]] = []
        return Answer(201, deployment)

    def _check_contexts(self, sha: str, required: Any) -> None:
        """GitHub's default: every context on the commit must be success (409 otherwise)."""
        latest: dict[str, str] = {}
        for status in self._statuses_of(sha):
            latest.setdefault(status["context"], status["state"])
        contexts = list(latest) if required is None else required
        failing = [c for c in contexts if latest.get(c) != "success"]
        if failing:
            message = f"Conflict: Commit status checks failed for {sha}."
            raise ApiError(409, message, [{"contexts": failing}])

    def _deployment(self, ident: str) -> dict[str, Any]:
        for deployment in self.state.deployments:
            if deployment["id"] == int(ident):
                return deployment
        raise ApiError(404, "Not Found")

    def _list_deployments(self, _: dict[str, str], query: dict[str, str], __: Any) -> Answer:
        found = [
            d
            for d in reversed(self.state.deployments)
            if all(
                d[key] == query[key]
                for key in ("environment", "ref", "sha", "task")
                if key in query
            )
        ]
        return _page(found, query)

    def _get_deployment(self, args: dict[str, str], _: dict[str, str], __: Any) -> Answer:
        return Answer(200, self._deployment(args["id"]))

    def _post_deployment_status(self, args: dict[str, str], _: dict[str, str], body: Any) -> Answer:
        deployment = self._deployment(args["id"])
        body = _object(body)
        state = body.get("state")
        if state not in DEPLOYMENT_STATES:
            raise ApiError(422, "Validation Failed", [_invalid("DeploymentStatus", "state", state)])
        status = self._deployment_status(deployment, state, body)
        self.state.deployment_statuses[deployment["id"]].append(status)
        if state == "success" and body.get("auto_inactive", True):
            self._inactivate_prior(deployment)
        return Answer(201, status)

    def _deployment_status(
        self, deployment: dict[str, Any], state: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "id": next(self._ids),
            "node_id": "DS",
            "url": deployment["statuses_url"],
            "state": state,
            "creator": BOT,
            "description": body.get("description") or "",
            "environment": body.get("environment") or deployment["environment"],
            "target_url": body.get("log_url") or body.get("target_url") or "",
            "log_url": body.get("log_url") or "",
            "environment_url": body.get("environment_url") or "",
            "created_at": _now(),
            "updated_at": _now(),
            "deployment_url": deployment["url"],
            "repository_url": self._api(),
        }

    def _inactivate_prior(self, current: dict[str, Any]) -> None:
        """GitHub's auto_inactive: earlier successful deployments of the environment."""
        for other in self.state.deployments:
            if other["id"] == current["id"] or other["environment"] != current["environment"]:
                continue
            history = self.state.deployment_statuses[other["id"]]
            if history and history[-1]["state"] == "success":
                body = {"description": f"replaced by deployment {current['id']}"}
                history.append(self._deployment_status(other, "inactive", body))

    def _list_deployment_statuses(
        self, args: dict[str, str], query: dict[str, str], _: Any
    ) -> Answer:
        deployment = self._deployment(args["id"])
        return _page(list(reversed(self.state.deployment_statuses[deployment["id"]])), query)

    def _issue(self, number: str) -> int:
        if int(number) not in self.state.pulls:
            raise ApiError(404, "Not Found")
        return int(number)

    def _list_comments(self, args: dict[str, str], query: dict[str, str], _: Any) -> Answer:
        number = self._issue(args["number"])
        return _page([c for c in self.state.comments if c["issue"] == number], query)

    def _post_comment(self, args: dict[str, str], _: dict[str, str], body: Any) -> Answer:
        number = self._issue(args["number"])
        text = _object(body).get("body")
        if not isinstance(text, str) or not text:
            raise ApiError(422, "Validation Failed", [_invalid("IssueComment", "body", text)])
        comment = {
            "id": next(self._ids),
            "node_id": "IC",
            "issue": number,
            "body": text,
            "user": BOT,
            "created_at": _now(),
            "updated_at": _now(),
            "author_association": "NONE",
        }
        comment["url"] = self._api("issues", "comments", comment["id"])
        comment["html_url"] = f"https://github.com/{self.repository}/pull/{number}"
        comment["issue_url"] = self._api("issues", number)
        self.state.comments.append(comment)
        return Answer(201, comment)

    def _patch_comment(self, args: dict[str, str], _: dict[str, str], body: Any) -> Answer:
        text = _object(body).get("body")
        for comment in self.state.comments:
            if comment["id"] == int(args["id"]):
                if not isinstance(text, str) or not text:
                    raise ApiError(422, "Validation Failed", [_invalid("IssueComment", "body", "")])
                comment.update(body=text, updated_at=_now())
                return Answer(200, comment)
        raise ApiError(404, "Not Found")

    def _branch(self, name: str) -> str:
        if name not in self.state.branches:
            raise ApiError(404, "Branch not found")
        return name

    def _get_protection(self, args: dict[str, str], _: dict[str, str], __: Any) -> Answer:
        branch = self._branch(args["branch"])
        if branch not in self.state.protection:
            raise ApiError(404, "Branch not protected")
        return Answer(200, self.state.protection[branch])

    def _put_protection(self, args: dict[str, str], _: dict[str, str], body: Any) -> Answer:
        branch = self._branch(args["branch"])
        body = _object(body)
        required = (
            "required_status_checks",
            "enforce_admins",
            "required_pull_request_reviews",
            "restrictions",
        )
        missing = [key for key in required if key not in body]
        if missing:
            raise ApiError(422, f"Invalid request.\n\n{', '.join(missing)} wasn't supplied.")
        self.state.protection[branch] = _protection_view(self._api("branches", branch), body)
        return Answer(200, self.state.protection[branch])

    def _list_environments(self, _: dict[str, str], query: dict[str, str], __: Any) -> Answer:
        everything = list(self.state.environments.values())
        answer = _page(everything, query)
        answer.body = {"total_count": len(everything), "environments": answer.body}
        return answer

    def _get_environment(self, args: dict[str, str], _: dict[str, str], __: Any) -> Answer:
        if args["name"] not in self.state.environments:
            raise ApiError(404, "Not Found")
        return Answer(200, self.state.environments[args["name"]])

    def _put_environment(self, args: dict[str, str], _: dict[str, str], body: Any) -> Answer:
        body = _object(body) if body is not None else {}
        old = self.state.environments.get(args["name"])
        rules = []
        if body.get("wait_timer"):
            rules.append({"id": 1, "type": "wait_timer", "wait_timer": body["wait_timer"]})
        if body.get("reviewers"):
            rules.append({"id": 2, "type": "required_reviewers", "reviewers": body["reviewers"]})
        environment = {
            "id": old["id"] if old else next(self._ids),
            "node_id": "E",
            "name": args["name"],
            "url": self._api("environments", args["name"]),
            "html_url": f"https://github.com/{self.repository}/deployments/{args['name']}",
            "created_at": old["created_at"] if old else _now(),
            "updated_at": _now(),
            "protection_rules": rules,
            "deployment_branch_policy": body.get("deployment_branch_policy"),
            "can_admins_bypass": body.get("can_admins_bypass", True),
        }
        self.state.environments[args["name"]] = environment
        return Answer(200, environment)

    def _scope(self, args: dict[str, str]) -> str:
        """ "" for the repository's secrets, else the environment's (which must exist)."""
        scope = args.get("env", "")
        if scope and scope not in self.state.environments:
            raise ApiError(404, "Not Found")
        return scope

    def _public_key(self, args: dict[str, str], __: dict[str, str], ___: Any) -> Answer:
        private, key_id = self._key(self._scope(args))
        key = base64.b64encode(bytes(private.public_key)).decode()
        return Answer(200, {"key_id": key_id, "key": key})

    def _list_secrets(self, args: dict[str, str], query: dict[str, str], __: Any) -> Answer:
        held = self.state.secrets.setdefault(self._scope(args), {})
        everything = [held[n] for n in sorted(held)]
        answer = _page(everything, query)
        answer.body = {"total_count": len(everything), "secrets": answer.body}
        return answer

    def _get_secret(self, args: dict[str, str], _: dict[str, str], __: Any) -> Answer:
        held = self.state.secrets.setdefault(self._scope(args), {})
        if args["name"].upper() not in held:
            raise ApiError(404, "Not Found")
        return Answer(200, held[args["name"].upper()])

    def _put_secret(self, args: dict[str, str], _: dict[str, str], body: Any) -> Answer:
        scope = self._scope(args)
        private, key_id = self._key(scope)
        body = _object(body)
        if body.get("key_id") != key_id:
            raise ApiError(422, "Bad request: key_id is not the current key's")
        try:
            sealed = base64.b64decode(body.get("encrypted_value") or "", validate=True)
            value = SealedBox(private).decrypt(sealed).decode()
        except Exception as exc:
            raise ApiError(422, f"Bad request: cannot decrypt encrypted_value: {exc}") from exc
        name = args["name"].upper()
        held = self.state.secrets.setdefault(scope, {})
        created = name not in held
        old = held.get(name, {})
        held[name] = {
            "name": name,
            "created_at": old.get("created_at", _now()),
            "updated_at": _now(),
        }
        self.state.secret_values.setdefault(scope, {})[name] = value
        return Answer(201 if created else 204)


# --- helpers ---------------------------------------------------------------------------


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "Problems parsing JSON")
    return body


def _invalid(resource: str, name: str, value: Any) -> dict[str, Any]:
    return {"resource": resource, "field": name, "code": "invalid", "value": value}


def _page(items: list[Any], query: dict[str, str]) -> Answer:
    """One page of `items` as GitHub pages lists; the Link header is filled in by `_answer`."""
    try:
        per_page = min(max(int(query.get("per_page", "30")), 1), 100)
        page = max(int(query.get("page", "1")), 1)
    except ValueError as exc:
        raise ApiError(422, "Validation Failed: per_page and page must be integers") from exc
    last = max((len(items) + per_page - 1) // per_page, 1)
    body = items[(page - 1) * per_page : page * per_page]
    return Answer(200, body, {"x-link-pages": f"{page} {last} {per_page}"})


def _links(host: str, path: str, query: dict[str, str], page: int, last: int, per: int) -> str:
    def url(number: int) -> str:
        return f"http://{host}{path}?{urlencode({**query, 'per_page': per, 'page': number})}"

    links = []
    if page < last:
        links += [f'<{url(page + 1)}>; rel="next"', f'<{url(last)}>; rel="last"']
    if page > 1:
        links += [f'<{url(1)}>; rel="first"', f'<{url(page - 1)}>; rel="prev"']
    return ", ".join(links)


def _protection_view(url: str, body: dict[str, Any]) -> dict[str, Any]:
    """Branch protection as GitHub answers a GET: each setting as an object of its own."""
    checks = body["required_status_checks"]
    reviews = body["required_pull_request_reviews"]
    view: dict[str, Any] = {
        "url": url + "/protection",
        "enforce_admins": {"url": url + "/enforce_admins", "enabled": bool(body["enforce_admins"])},
        "allow_force_pushes": {"enabled": bool(body.get("allow_force_pushes") or False)},
        "allow_deletions": {"enabled": bool(body.get("allow_deletions") or False)},
        "required_linear_history": {"enabled": bool(body.get("required_linear_history") or False)},
        "required_conversation_resolution": {
            "enabled": bool(body.get("required_conversation_resolution") or False)
        },
    }
    if checks is not None:
        contexts = list(checks.get("contexts") or [c["context"] for c in checks.get("checks", [])])
        view["required_status_checks"] = {
            "url": url + "/protection/required_status_checks",
            "strict": bool(checks.get("strict")),
            "contexts": contexts,
            "checks": [{"context": c, "app_id": None} for c in contexts],
        }
    if reviews is not None:
        view["required_pull_request_reviews"] = {
            "url": url + "/protection/required_pull_request_reviews",
            "dismiss_stale_reviews": bool(reviews.get("dismiss_stale_reviews")),
            "require_code_owner_reviews": bool(reviews.get("require_code_owner_reviews")),
            "required_approving_review_count": int(
                reviews.get("required_approving_review_count", 1)
            ),
            "require_last_push_approval": bool(reviews.get("require_last_push_approval")),
        }
    return view


@contextmanager
def github_server(**kwargs: Any) -> Iterator[GitHubServer]:
    """A started `GitHubServer(**kwargs)`, stopped afterwards."""
    server = GitHubServer(**kwargs).start()
    try:
        yield server
    finally:
        server.stop()

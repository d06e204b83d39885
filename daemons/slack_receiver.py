"""The Slack receiver: where Slack sends the Approve / Reject button presses.

    POST /slack/actions   a block_actions interaction (Slack's "Request URL")
    GET  /health          200 "ok"

A press is checked in this order, and each refusal changes nothing:

    401  not signed with the app's signing secret, timestamp over 5 minutes off, a replay
    400  not a press of one of the approval buttons (`tasks.slack_actions`)
    403  the Slack user is not mapped to an approver (`slack_users: {U123: alice}`)

then `on_decision(decision, approver_name)` acts on it and its text is the 200 answer.
An `ApprovalError` from it (run not paused, answer refused) answers 409 with its message;
anything else 500. Slack wants an answer within 3 seconds: `on_decision` must be quick.

Two ways to run it:

- `cicd stack up` runs it as a part of the stack, beside the worker, as
  `python -m daemons.slack_receiver --port 3000 --from-prefect`: the signing secret comes from
  the Secret block the gate checks with (`elice-slack-signing-secret`), the Slack users
  from the approval policy on the protected branch, both read again after
  `REFRESH_S` (an unsaved secret or an unreadable policy answers 503, changing nothing).
- By hand: `python -m daemons.slack_receiver --port 3000 --users FILE`, the signing secret
  from ELICE_SLACK_SIGNING_SECRET.

The secret is never logged. Slack must reach it over HTTPS: put a TLS proxy or tunnel in
front of the loopback address.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml
from pydantic import SecretStr

from blocks.approvals import POLICY_FILE, parse_policy
from blocks.repository import pinned_repository
from core.errors import ApprovalError, ConfigError, SlackRequestRefused, Unavailable
from core.settings import Settings
from tasks.approval import resume_from_slack, slack_signing_secret
from tasks.slack_actions import (
    MAX_BODY_BYTES,
    ReplayGuard,
    SlackDecision,
    SlackProof,
    approver_for,
    header_value,
    parse_slack_decision,
    verify_slack_request,
)
from tasks.workspace import read_protected_file

ACTIONS_PATH = "/slack/actions"
SECRET_ENV = "ELICE_SLACK_SIGNING_SECRET"  # noqa: S105 - the variable's name
REQUEST_TIMEOUT_S = 10
REFRESH_S = 30.0
T = TypeVar("T")
DecisionHandler = Callable[[SlackDecision, str], str]

log = logging.getLogger("elice.slack_receiver")


class Refreshed(Generic[T]):
    """A value read by `read` and kept for `ttl_s` seconds; a None read is not kept.

    When a refresh fails, the last good value serves on; with none, `Unavailable`.
    """

    def __init__(self, read: Callable[[], T | None], what: str, ttl_s: float = REFRESH_S) -> None:
        self._read = read
        self._what = what
        self._ttl_s = ttl_s
        self._value: T | None = None
        self._at = -float("inf")
        self._lock = threading.Lock()

    def __call__(self) -> T:
        with self._lock:
            if self._value is not None and time.monotonic() - self._at < self._ttl_s:
                return self._value
            try:
                value = self._read()
            except Exception as exc:  # noqa: BLE001 - any failure to read: serve the last value
                if self._value is not None:
                    log.warning("slack: %s not refreshed (%s)", self._what, type(exc).__name__)
                    return self._value
                msg = f"{self._what} cannot be read ({type(exc).__name__}): nothing was changed"
                raise Unavailable(msg) from None
            if value is None:
                msg = f"{self._what} is not saved: nothing was changed"
                raise Unavailable(msg)
            self._value, self._at = value, time.monotonic()
            return value


class SlackReceiver:
    """An HTTP server for Slack's button presses, on `host:port` (port 0: a free one)."""

    def __init__(
        self,
        signing_secret: SecretStr | Callable[[], SecretStr],
        slack_users: Mapping[str, str] | Callable[[], Mapping[str, str]],
        on_decision: DecisionHandler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Bind the socket (serving starts with `start` or `serve_forever`).

        `signing_secret` and `slack_users` are values, or callables read at each press
        (raising `Unavailable` when they cannot be had: that press answers 503).

        Raises:
            ValueError: the signing secret given as a value is empty.
            OSError: the address cannot be bound.
        """
        if isinstance(signing_secret, SecretStr) and not signing_secret.get_secret_value():
            msg = f"the Slack signing secret is empty (set {SECRET_ENV})"
            raise ValueError(msg)
        self._secret = signing_secret
        self._users = slack_users if callable(slack_users) else dict(slack_users)
        self._on_decision = on_decision
        self._clock = clock
        self._seen = ReplayGuard()
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None
        bound_host, bound_port = self._server.server_address[:2]
        self.url = f"http://{bound_host!s}:{bound_port}"

    def __repr__(self) -> str:
        users = "from the policy" if callable(self._users) else len(self._users)
        return f"SlackReceiver(url={self.url!r}, users={users})"

    def answer(
        self, path: str, headers: Sequence[tuple[str, str]], body: bytes, client: str = "-"
    ) -> tuple[int, str]:
        """(HTTP status, text) for a POST of `body` to `path` from address `client`."""
        if path != ACTIONS_PATH:
            return 404, "not found"
        try:
            secret = self._secret() if callable(self._secret) else self._secret
            users = self._users() if callable(self._users) else self._users
        except Unavailable as exc:
            log.error("slack: request from %s not judged: %s", client, exc)  # noqa: TRY400
            return 503, str(exc)
        try:
            verify_slack_request(secret, headers, body, self._clock(), self._seen)
            decision = parse_slack_decision(body).model_copy(
                update={
                    "proof": SlackProof(
                        timestamp=header_value(headers, "X-Slack-Request-Timestamp"),
                        signature=header_value(headers, "X-Slack-Signature"),
                        body=body.decode("utf-8"),
                    )
                }
            )
            approver = approver_for(decision.user_id, users)
        except SlackRequestRefused as exc:
            log.warning("slack: request from %s refused (%d): %s", client, exc.status, exc)
            return exc.status, str(exc)
        log.info(
            "slack: %s of run %s (release %s) by %s (%s)",
            decision.action,
            decision.run_id,
            decision.release_id,
            approver,
            decision.user_id,
        )
        try:
            return 200, self._on_decision(decision, approver)
        except ApprovalError as exc:
            log.warning("slack: %s by %s not applied: %s", decision.action, approver, exc)
            return 409, str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad press must not stop the receiver
            log.error("slack: handling %s failed: %s", decision.action, type(exc).__name__)  # noqa: TRY400
            return 500, "internal error: nothing was changed"

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = REQUEST_TIMEOUT_S

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("slack receiver: " + format, *args)  # noqa: G003

            def _reply(self, status: int, text: str) -> None:
                data = (text.strip() + "\n").encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/health":
                    self._reply(200, "ok")
                elif self.path == ACTIONS_PATH:
                    self._reply(405, "POST only")
                else:
                    self._reply(404, "not found")

            def do_POST(self) -> None:
                raw = self.headers.get("Content-Length")
                if raw is None or not raw.strip().isdigit():
                    self.close_connection = True
                    self._reply(411, "Content-Length required")
                    return
                length = int(raw)
                if length > MAX_BODY_BYTES:
                    self.close_connection = True
                    self._reply(413, f"body larger than {MAX_BODY_BYTES} bytes")
                    return
                body = self.rfile.read(length)
                headers = list(self.headers.items())
                status, text = receiver.answer(self.path, headers, body, self.client_address[0])
                self._reply(status, text)

        return Handler

    def start(self) -> SlackReceiver:
        """Serve in a background thread."""
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="slack-receiver", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until `stop` (or an interrupt)."""
        self._server.serve_forever()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def load_slack_users(path: Path) -> dict[str, str]:
    """A `{slack user id: approver name}` mapping from a YAML or JSON file.

    Raises:
        ValueError: unreadable, or not a mapping of strings.
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        msg = f"{path}: cannot read the Slack users: {exc}"
        raise ValueError(msg) from exc
    if isinstance(data, dict) and isinstance(data.get("slack_users"), dict):
        data = data["slack_users"]
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        msg = f"{path}: expected a mapping of Slack user id to approver name"
        raise ValueError(msg)
    return dict(data)


def _policy_users() -> dict[str, str]:
    """The Slack users of the approval policy on the protected branch (none committed:
    no users, and every press is refused 403)."""
    repository = pinned_repository(Settings.from_environ())
    try:
        text = read_protected_file(repository, POLICY_FILE)
    except ConfigError:
        return {}
    return dict(parse_policy(text, f"{POLICY_FILE} on {repository.protected_branch}").slack_users)


def main(
    argv: Sequence[str] | None = None,
    *,
    on_decision: DecisionHandler = resume_from_slack,
    environ: Mapping[str, str] = os.environ,
) -> int:
    """`python -m daemons.slack_receiver`: serve until interrupted; 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m daemons.slack_receiver", description="Receive Slack approval buttons."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=3000, help="port (0: a free one)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--users", type=Path, help="YAML/JSON file: slack_users: {U123: alice, ...}"
    )
    source.add_argument(
        "--from-prefect",
        action="store_true",
        help=(
            "the signing secret from the Prefect Secret block the gate checks with, the "
            "Slack users from the approval policy on the protected branch"
        ),
    )
    args = parser.parse_args(argv)
    secret: SecretStr | Callable[[], SecretStr]
    users: Mapping[str, str] | Callable[[], Mapping[str, str]]
    try:
        if args.from_prefect:
            secret = Refreshed(slack_signing_secret, "the Slack signing secret (Secret block)")
            users = Refreshed(_policy_users, "the approval policy's Slack users")
        else:
            secret = SecretStr(environ.get(SECRET_ENV, ""))
            users = load_slack_users(args.users) if args.users else {}
        receiver = SlackReceiver(secret, users, on_decision, host=args.host, port=args.port)
    except (ValueError, OSError) as exc:
        print(f"slack receiver: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not args.from_prefect and not users:
        log.warning("slack: no Slack users mapped to approvers: every press is refused (403)")
    print(f"slack receiver listening on {receiver.url}{ACTIONS_PATH}", flush=True)
    try:
        receiver.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        receiver.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

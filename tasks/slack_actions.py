"""Slack interactivity for the approval gate: the buttons, and the requests they send back.

    approval_actions(run_id, release_id, environment)   the Approve / Reject actions block
    with_approval_actions(blocks, ...)                  a notice's blocks with it added
    verify_slack_request(secret, headers, body, now, seen)
        Slack's request signature, as api.slack.com/authentication/verifying-requests-from-slack
        documents it: HMAC-SHA256 of "v0:<X-Slack-Request-Timestamp>:<raw body>" with the
        app's signing secret, hex, "v0=" prefixed, in X-Slack-Signature; the timestamp
        within 5 minutes; a signature seen before (within that window) refused
    parse_slack_decision(body)                          the `payload` of a block_actions POST
    approver_for(user_id, slack_users)                  Slack user id -> approver name

Errors:

    ApprovalError (core.errors, where these are defined)
    └── SlackRequestRefused     a Slack request that must change nothing
        ├── SlackSignatureInvalid   not signed by Slack, stale, or a replay    (HTTP 401)
        ├── SlackPayloadInvalid     not an approval button press of ours        (HTTP 400)
        └── SlackUserUnknown        the Slack user is no configured approver    (HTTP 403)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from core.errors import (
    SlackPayloadInvalid,
    SlackSignatureInvalid,
    SlackUserUnknown,
)

APPROVE_ACTION = "elice_approve"
REJECT_ACTION = "elice_reject"
ACTIONS_BLOCK_ID = "elice_approval"
MAX_SKEW_S = 5 * 60
"""Slack's rule: a request whose timestamp is further than this from now is refused."""
MAX_BODY_BYTES = 64 * 1024

_ACTIONS: dict[str, Literal["approve", "reject"]] = {
    APPROVE_ACTION: "approve",
    REJECT_ACTION: "reject",
}
_RELEASE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_USER_ID = re.compile(r"[UW][A-Z0-9]{2,31}")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")


class SlackDecision(BaseModel):
    """One press of Approve or Reject, as Slack reported it (after its signature was checked).

    `user_name` is Slack's display handle, for messages only: identity is `user_id`,
    mapped by `approver_for`.
    """

    model_config = ConfigDict(frozen=True)

    user_id: str = Field(description="Slack user id (U... or W...)")
    user_name: str = Field(description="Slack username, as shown; never an identity")
    team_id: str = Field(default="", description="Slack workspace id")
    action: Literal["approve", "reject"] = Field(description="The button pressed")
    run_id: str = Field(description="The paused promotion's flow run id")
    release_id: str = Field(description="The release the message asked about")
    response_url: str = Field(description="Where Slack accepts follow-up messages (30 min)")
    proof: SlackProof | None = Field(
        default=None, description="The signed request itself, for the gate to check again"
    )


class SlackProof(BaseModel):
    """A Slack request as received: what the gate needs to verify it on its own."""

    model_config = ConfigDict(frozen=True)

    timestamp: str
    signature: str
    body: str

    def headers(self) -> list[tuple[str, str]]:
        """The two headers `verify_slack_request` reads."""
        return [
            ("X-Slack-Request-Timestamp", self.timestamp),
            ("X-Slack-Signature", self.signature),
        ]


# --- the message ----------------------------------------------------------------------------


def _button_value(run_id: str, release_id: str) -> str:
    run = str(UUID(run_id))
    if not _RELEASE.fullmatch(release_id):
        msg = f"release_id must match {_RELEASE.pattern}, got {release_id!r}"
        raise ValueError(msg)
    return json.dumps({"run_id": run, "release_id": release_id}, separators=(",", ":"))


def approval_actions(run_id: str, release_id: str, environment: str) -> dict[str, Any]:
    """The Block Kit `actions` block with Approve and Reject for one paused run.

    Each button's `value` is `{"run_id": ..., "release_id": ...}` (compact JSON); both ask
    for confirmation in Slack before they are sent.

    Raises:
        ValueError: `run_id` is not a UUID, or `release_id` not a release id.
    """
    value = _button_value(run_id, release_id)

    def button(action_id: str, text: str, style: str, verb: str) -> dict[str, Any]:
        return {
            "type": "button",
            "action_id": action_id,
            "text": {"type": "plain_text", "text": text},
            "style": style,
            "value": value,
            "confirm": {
                "title": {"type": "plain_text", "text": f"{text} the release?"},
                "text": {
                    "type": "mrkdwn",
                    "text": f"{verb} release `{release_id}` to *{environment}*.",
                },
                "confirm": {"type": "plain_text", "text": text},
                "deny": {"type": "plain_text", "text": "Cancel"},
            },
        }

    return {
        "type": "actions",
        "block_id": ACTIONS_BLOCK_ID,
        "elements": [
            button(APPROVE_ACTION, "Approve", "primary", "Deploy"),
            button(REJECT_ACTION, "Reject", "danger", "Do not deploy"),
        ],
    }


def with_approval_actions(
    blocks: list[dict[str, Any]], run_id: str, release_id: str, environment: str
) -> list[dict[str, Any]]:
    """`blocks` (e.g. `tasks.notify.slack_blocks`) with the approval buttons added.

    The buttons join the first `actions` block (before its other buttons); without one,
    a new actions block goes before the trailing `context` block, or at the end.

    Raises:
        ValueError: as `approval_actions`.
    """
    actions = approval_actions(run_id, release_id, environment)
    result = [dict(b) for b in blocks]
    for index, block in enumerate(result):
        if block.get("type") == "actions":
            merged = {**block, "elements": [*actions["elements"], *block.get("elements", [])]}
            merged["elements"] = merged["elements"][:25]  # Slack's limit per actions block
            result[index] = merged
            return result
    at = len(result) - 1 if result and result[-1].get("type") == "context" else len(result)
    result.insert(at, actions)
    return result


# --- the request ----------------------------------------------------------------------------


class ReplayGuard:
    """Signatures already accepted, remembered while their timestamp could still pass.

    Thread-safe; one per receiver process.
    """

    def __init__(self, window_s: int = MAX_SKEW_S) -> None:
        self._window = window_s
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()

    def first_time(self, signature: str, timestamp: int, now: float) -> bool:
        """Remember `signature`; False when it was seen before."""
        with self._lock:
            horizon = now - 2 * self._window
            for old in [s for s, ts in self._seen.items() if ts < horizon]:
                del self._seen[old]
            if signature in self._seen:
                return False
            self._seen[signature] = timestamp
            return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)


def header_value(headers: Mapping[str, str] | Sequence[tuple[str, str]], name: str) -> str:
    items = headers.items() if isinstance(headers, Mapping) else headers
    wanted = name.lower()
    values = [v for k, v in items if k.lower() == wanted]
    if len(values) != 1:
        msg = f"{name}: {'missing' if not values else 'sent more than once'}"
        raise SlackSignatureInvalid(msg)
    return values[0].strip()


def expected_signature(signing_secret: SecretStr, timestamp: str, body: bytes) -> str:
    """`v0=` + hex HMAC-SHA256 of `v0:<timestamp>:<body>` under the signing secret."""
    base = b"v0:" + timestamp.encode("ascii") + b":" + body
    key = signing_secret.get_secret_value().encode("utf-8")
    return "v0=" + hmac.new(key, base, hashlib.sha256).hexdigest()


def verify_slack_request(
    signing_secret: SecretStr,
    headers: Mapping[str, str] | Sequence[tuple[str, str]],
    body: bytes,
    now: float,
    seen: ReplayGuard,
) -> None:
    """Refuse a request that Slack did not sign just now, or that was sent before.

    `headers`: a mapping, or (name, value) pairs so that a repeated header is seen; names
    in any case. `body`: the raw request body. `now`: Unix time in seconds.

    Raises:
        SlackSignatureInvalid: signature headers missing or malformed, timestamp further
            than 5 minutes from `now`, signature wrong, or the same signature seen before.
        ValueError: the signing secret is empty (a configuration error, before any check).
    """
    if not signing_secret.get_secret_value():
        msg = "the Slack signing secret is empty"
        raise ValueError(msg)
    timestamp = header_value(headers, "X-Slack-Request-Timestamp")
    signature = header_value(headers, "X-Slack-Signature")
    if not _TIMESTAMP.fullmatch(timestamp):
        msg = "X-Slack-Request-Timestamp is not a Unix time"
        raise SlackSignatureInvalid(msg)
    if abs(now - int(timestamp)) > MAX_SKEW_S:
        msg = f"request timestamp {timestamp} is more than {MAX_SKEW_S}s from now: refused"
        raise SlackSignatureInvalid(msg)
    expected = expected_signature(signing_secret, timestamp, body)
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        msg = "X-Slack-Signature does not match the request: not signed by Slack"
        raise SlackSignatureInvalid(msg)
    if not seen.first_time(signature, int(timestamp), now):
        msg = "this request was received before: replay refused"
        raise SlackSignatureInvalid(msg)


def _field(data: Mapping[str, Any], key: str, where: str) -> Any:
    value = data.get(key)
    if value is None:
        msg = f"payload: {where}{key}: missing"
        raise SlackPayloadInvalid(msg)
    return value


def _payload(body: bytes) -> dict[str, Any]:
    """The `payload` JSON object of a form-encoded block_actions interaction.

    Raises:
        SlackPayloadInvalid: too large, not a form with one JSON payload, not block_actions.
    """
    if len(body) > MAX_BODY_BYTES:
        msg = f"body larger than {MAX_BODY_BYTES} bytes"
        raise SlackPayloadInvalid(msg)
    try:
        form = parse_qs(body.decode("utf-8"), strict_parsing=True, max_num_fields=20)
        (raw,) = form["payload"]
        payload = json.loads(raw)
    except (UnicodeDecodeError, ValueError, KeyError) as exc:
        msg = f"body is not a form with one JSON payload field: {type(exc).__name__}"
        raise SlackPayloadInvalid(msg) from exc
    if not isinstance(payload, dict):
        msg = "payload: not a JSON object"
        raise SlackPayloadInvalid(msg)
    if payload.get("type") != "block_actions":
        msg = f"payload: type: {payload.get('type')!r} is not block_actions"
        raise SlackPayloadInvalid(msg)
    return payload


def _run_and_release(action: dict[str, Any]) -> tuple[str, str]:
    """The run id and release id an approval button carries as its value.

    Raises:
        SlackPayloadInvalid: not a run id and release id of ours.
    """
    try:
        value = json.loads(_field(action, "value", "actions[0]."))
        run_id = str(UUID(value["run_id"]))
        release_id = value["release_id"]
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        msg = "payload: actions[0].value: not a run id and release id of ours"
        raise SlackPayloadInvalid(msg) from exc
    if not isinstance(release_id, str) or not _RELEASE.fullmatch(release_id):
        msg = f"payload: actions[0].value: release_id {release_id!r} is not a release id"
        raise SlackPayloadInvalid(msg)
    return run_id, release_id


def parse_slack_decision(body: bytes) -> SlackDecision:
    """The button press in a `block_actions` interaction (form field `payload`, JSON).

    Raises:
        SlackPayloadInvalid: not form-encoded with one `payload`, not JSON, not a
            block_actions of one of our two buttons, or the button's value is not ours.
    """
    payload = _payload(body)
    user = _field(payload, "user", "")
    actions = _field(payload, "actions", "")
    if not isinstance(user, dict) or not isinstance(actions, list) or len(actions) != 1:
        msg = "payload: needs a user object and exactly one action"
        raise SlackPayloadInvalid(msg)
    (action,) = actions
    if not isinstance(action, dict) or action.get("action_id") not in _ACTIONS:
        got = action.get("action_id") if isinstance(action, dict) else action
        msg = f"payload: actions[0].action_id: {got!r} is not an approval button"
        raise SlackPayloadInvalid(msg)
    user_id = _field(user, "id", "user.")
    if not isinstance(user_id, str) or not _USER_ID.fullmatch(user_id):
        msg = f"payload: user.id: {user_id!r} is not a Slack user id"
        raise SlackPayloadInvalid(msg)
    run_id, release_id = _run_and_release(action)
    response_url = payload.get("response_url", "")
    if not isinstance(response_url, str) or (
        response_url and urlsplit(response_url).scheme not in ("http", "https")
    ):
        msg = "payload: response_url: not an http(s) URL"
        raise SlackPayloadInvalid(msg)
    name = user.get("username") or user.get("name") or ""
    team_info = payload.get("team")
    team = user.get("team_id") or (team_info.get("id") if isinstance(team_info, dict) else "")
    return SlackDecision(
        user_id=user_id,
        user_name=str(name)[:80],
        team_id=str(team or "")[:32],
        action=_ACTIONS[action["action_id"]],
        run_id=run_id,
        release_id=release_id,
        response_url=response_url,
    )


def approver_for(user_id: str, slack_users: Mapping[str, str]) -> str:
    """The approver name configured for Slack user `user_id` (`slack_users: {U123: alice}`).

    Raises:
        SlackUserUnknown: the user id is not in the mapping (or maps to an empty name).
    """
    name = slack_users.get(user_id, "")
    if not name.strip():
        msg = f"Slack user {user_id} is not a configured approver"
        raise SlackUserUnknown(msg)
    return name

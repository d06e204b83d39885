"""Slack approval buttons, request signatures and button payloads (no network needed)."""

from __future__ import annotations

import hashlib
import hmac
import json
import pickle
import time
from typing import Any
from urllib.parse import urlencode

import pytest
from pydantic import SecretStr

from core.errors import (
    ApprovalError,
    SlackPayloadInvalid,
    SlackRequestRefused,
    SlackSignatureInvalid,
    SlackUserUnknown,
)
from tasks.notify import Notice, slack_blocks
from tasks.slack_actions import (
    APPROVE_ACTION,
    MAX_SKEW_S,
    REJECT_ACTION,
    ReplayGuard,
    approval_actions,
    approver_for,
    parse_slack_decision,
    verify_slack_request,
    with_approval_actions,
)

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
RUN_ID = "0b6f3c52-8d0e-4a43-9a53-6d8a2b1f0c11"


def slack_sign(secret: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers Slack sends, computed as its documentation says."""
    base = f"v0:{timestamp}:".encode() + body
    digest = hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": str(timestamp), "X-Slack-Signature": f"v0={digest}"}


def button_payload(
    action_id: str = APPROVE_ACTION,
    user_id: str = "U0123ABCD",
    value: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "type": "block_actions",
        "user": {"id": user_id, "username": "alice.k", "name": "alice.k", "team_id": "T0001"},
        "team": {"id": "T0001", "domain": "elice"},
        "api_app_id": "A0001",
        "trigger_id": "1.2.3",
        "response_url": "https://hooks.slack.com/actions/T0001/1/abc",
        "actions": [
            {
                "type": "button",
                "action_id": action_id,
                "block_id": "elice_approval",
                "value": value or json.dumps({"run_id": RUN_ID, "release_id": "3f9a0c1b2d4e"}),
                "action_ts": "1700000000.000100",
            }
        ],
    }
    payload.update(extra)
    return payload


def form(payload: Any) -> bytes:
    return urlencode({"payload": json.dumps(payload)}).encode()


# --- the message ------------------------------------------------------------------------


def test_approval_actions_carry_run_and_release() -> None:
    block = approval_actions(RUN_ID.upper(), "3f9a0c1b2d4e", "production")
    assert block["type"] == "actions"
    approve, reject = block["elements"]
    assert (approve["action_id"], approve["style"]) == (APPROVE_ACTION, "primary")
    assert (reject["action_id"], reject["style"]) == (REJECT_ACTION, "danger")
    for button in (approve, reject):
        assert json.loads(button["value"]) == {"run_id": RUN_ID, "release_id": "3f9a0c1b2d4e"}
        assert "production" in button["confirm"]["text"]["text"]
    with pytest.raises(ValueError):
        approval_actions("run-1", "3f9a0c1b2d4e", "production")
    with pytest.raises(ValueError, match="release_id"):
        approval_actions(RUN_ID, "3f9a0c1b2d4e\n", "production")


def test_buttons_round_trip_through_the_parser() -> None:
    approve, reject = approval_actions(RUN_ID, "3f9a0c1b2d4e", "production")["elements"]
    for button, action in ((approve, "approve"), (reject, "reject")):
        payload = button_payload(button["action_id"], value=button["value"])
        decision = parse_slack_decision(form(payload))
        assert (decision.action, decision.run_id, decision.release_id) == (
            action,
            RUN_ID,
            "3f9a0c1b2d4e",
        )


def test_with_approval_actions_fits_the_notice_blocks() -> None:
    notice = Notice(
        kind="approval_needed",
        environment="production",
        release_id="3f9a0c1b2d4e",
        flow_run_url="http://127.0.0.1:4200/runs/flow-run/1",
    )
    blocks = slack_blocks(notice)
    merged = with_approval_actions(blocks, RUN_ID, "3f9a0c1b2d4e", "production")
    (actions,) = [b for b in merged if b["type"] == "actions"]
    ids = [e["action_id"] for e in actions["elements"]]
    assert ids == [APPROVE_ACTION, REJECT_ACTION, "open_flow_run"]
    assert len(merged) == len(blocks)
    assert [e["action_id"] for e in blocks[-2]["elements"]] == ["open_flow_run"]  # unchanged

    bare = slack_blocks(notice.model_copy(update={"flow_run_url": None}))
    added = with_approval_actions(bare, RUN_ID, "3f9a0c1b2d4e", "production")
    assert len(added) == len(bare) + 1
    assert added[-2]["type"] == "actions"
    assert added[-1]["type"] == "context"


# --- the signature ----------------------------------------------------------------------


def test_a_request_signed_as_slack_documents_is_accepted() -> None:
    body = form(button_payload())
    now = time.time()
    headers = slack_sign(SECRET, int(now), body)
    verify_slack_request(SecretStr(SECRET), headers, body, now, ReplayGuard())
    lower = {k.lower(): v for k, v in slack_sign(SECRET, int(now) - 10, body).items()}
    verify_slack_request(SecretStr(SECRET), lower, body, now, ReplayGuard())


def test_slack_documented_example_signature() -> None:
    """The worked example on Slack's "Verifying requests from Slack" page."""
    body = (
        b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&"
        b"channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&"
        b"command=%2Fwebhook-collect&text=&"
        b"response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F"
        b"96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
    )
    headers = {
        "X-Slack-Request-Timestamp": "1531420618",
        "X-Slack-Signature": (
            "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"
        ),
    }
    verify_slack_request(SecretStr(SECRET), headers, body, 1531420618 + 5, ReplayGuard())


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"secret": "another-secret"}, "not signed by Slack"),
        ({"body": b"payload=%7B%7D"}, "not signed by Slack"),
        ({"age": MAX_SKEW_S + 1}, "more than 300s"),
        ({"age": -(MAX_SKEW_S + 1)}, "more than 300s"),
        ({"drop": "X-Slack-Signature"}, "X-Slack-Signature: missing"),
        ({"drop": "X-Slack-Request-Timestamp"}, "X-Slack-Request-Timestamp: missing"),
        ({"timestamp": "12e3"}, "not a Unix time"),
        ({"signature": "v1=" + "0" * 64}, "not signed by Slack"),
    ],
)
def test_bad_requests_are_refused(change: dict[str, Any], problem: str) -> None:
    body = form(button_payload())
    now = time.time()
    headers = slack_sign(change.get("secret", SECRET), int(now) - change.get("age", 0), body)
    headers.pop(change.get("drop", ""), None)
    if "timestamp" in change:
        headers["X-Slack-Request-Timestamp"] = change["timestamp"]
    if "signature" in change:
        headers["X-Slack-Signature"] = change["signature"]
    with pytest.raises(SlackSignatureInvalid, match=problem):
        verify_slack_request(
            SecretStr(SECRET), headers, change.get("body", body), now, ReplayGuard()
        )


def test_a_stale_request_is_refused_even_when_correctly_signed() -> None:
    body = form(button_payload())
    now = float(int(time.time()))
    within = slack_sign(SECRET, int(now) - MAX_SKEW_S, body)
    verify_slack_request(SecretStr(SECRET), within, body, now, ReplayGuard())
    stale = slack_sign(SECRET, int(now) - MAX_SKEW_S - 1, body)
    with pytest.raises(SlackSignatureInvalid, match="more than"):
        verify_slack_request(SecretStr(SECRET), stale, body, now, ReplayGuard())


def test_a_replay_is_refused() -> None:
    body = form(button_payload())
    now = time.time()
    headers = slack_sign(SECRET, int(now), body)
    guard = ReplayGuard()
    verify_slack_request(SecretStr(SECRET), headers, body, now, guard)
    with pytest.raises(SlackSignatureInvalid, match="replay"):
        verify_slack_request(SecretStr(SECRET), headers, body, now + 1, guard)
    # A new press (new timestamp, so a new signature) is a new request.
    verify_slack_request(
        SecretStr(SECRET), slack_sign(SECRET, int(now) + 1, body), body, now, guard
    )


def test_a_refused_request_is_not_remembered() -> None:
    """Only signatures that verified count as seen: a forgery cannot block the real one."""
    body = form(button_payload())
    now = time.time()
    good = slack_sign(SECRET, int(now), body)
    guard = ReplayGuard()
    with pytest.raises(SlackSignatureInvalid):
        verify_slack_request(SecretStr(SECRET), good, body + b"x", now, guard)
    assert len(guard) == 0
    verify_slack_request(SecretStr(SECRET), good, body, now, guard)


def test_replay_guard_forgets_only_what_can_no_longer_pass() -> None:
    guard = ReplayGuard()
    assert guard.first_time("v0=a", 1000, 1000.0)
    assert not guard.first_time("v0=a", 1000, 1000.0 + MAX_SKEW_S)
    assert guard.first_time("v0=b", 1000 + 3 * MAX_SKEW_S, 1000.0 + 3 * MAX_SKEW_S)
    assert len(guard) == 1  # "v0=a" is out of every window now


def test_repeated_signature_header_is_refused() -> None:
    body = form(button_payload())
    now = time.time()
    headers = list(slack_sign(SECRET, int(now), body).items())
    headers.append(("x-slack-signature", "v0=" + "0" * 64))
    with pytest.raises(SlackSignatureInvalid, match="more than once"):
        verify_slack_request(SecretStr(SECRET), headers, body, now, ReplayGuard())


def test_empty_secret_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        verify_slack_request(SecretStr(""), {}, b"", time.time(), ReplayGuard())


def test_refusals_never_show_the_secret() -> None:
    body = form(button_payload())
    now = time.time()
    messages = []
    for headers in (slack_sign("x", int(now), body), {}, slack_sign(SECRET, 1, body)):
        with pytest.raises(SlackSignatureInvalid) as info:
            verify_slack_request(SecretStr(SECRET), headers, body, now, ReplayGuard())
        messages.append(f"{info.value} {info.value!r}")
    assert all(SECRET not in m for m in messages)


# --- the payload ------------------------------------------------------------------------


def test_parse_a_button_press() -> None:
    decision = parse_slack_decision(form(button_payload(REJECT_ACTION)))
    assert decision.model_dump(exclude={"proof"}) == {
        "user_id": "U0123ABCD",
        "user_name": "alice.k",
        "team_id": "T0001",
        "action": "reject",
        "run_id": RUN_ID,
        "release_id": "3f9a0c1b2d4e",
        "response_url": "https://hooks.slack.com/actions/T0001/1/abc",
    }


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"", "one JSON payload"),
        (b"\xff\xfe", "one JSON payload"),
        (b"payload=not-json", "one JSON payload"),
        (b"other=1", "one JSON payload"),
        (form(button_payload()) + b"&" + form(button_payload()), "one JSON payload"),
        (form([1, 2]), "not a JSON object"),
        (form(button_payload(type="view_submission")), "type"),
        (form(button_payload(actions=[])), "exactly one action"),
        (form(button_payload(user="U0123ABCD")), "user object"),
        (form(button_payload(action_id="open_flow_run")), "not an approval button"),
        (form(button_payload(user_id="alice")), "user.id"),
        (form(button_payload(value="approve")), "actions\\[0\\].value"),
        (form(button_payload(value='{"run_id": "x", "release_id": "r"}')), "value"),
        (form(button_payload(value=json.dumps({"run_id": RUN_ID}))), "value"),
        (
            form(button_payload(value=json.dumps({"run_id": RUN_ID, "release_id": "r\n"}))),
            "release_id",
        ),
        (form(button_payload(response_url="file:///etc/passwd")), "response_url"),
        (b"payload=" + b"x" * 70_000, "larger than"),
    ],
)
def test_bad_payloads_are_refused(body: bytes, problem: str) -> None:
    with pytest.raises(SlackPayloadInvalid, match=problem):
        parse_slack_decision(body)


# --- who pressed it ---------------------------------------------------------------------


def test_approver_for_maps_known_users_only() -> None:
    users = {"U0123ABCD": "alice", "U0BLANK": " "}
    assert approver_for("U0123ABCD", users) == "alice"
    with pytest.raises(SlackUserUnknown, match="U0999"):
        approver_for("U0999", users)
    with pytest.raises(SlackUserUnknown):
        approver_for("U0BLANK", users)


def test_refusals_are_approval_errors_with_statuses_and_pickle() -> None:
    assert issubclass(SlackRequestRefused, ApprovalError)
    statuses = {
        cls: cls.status for cls in (SlackSignatureInvalid, SlackPayloadInvalid, SlackUserUnknown)
    }
    assert statuses == {SlackSignatureInvalid: 401, SlackPayloadInvalid: 400, SlackUserUnknown: 403}
    copy = pickle.loads(pickle.dumps(SlackUserUnknown("Slack user U1 is not an approver")))
    assert type(copy) is SlackUserUnknown
    assert str(copy) == "Slack user U1 is not an approver"

"""Requests as Slack sends them when an approval button is pressed, signed as Slack
documents it (HMAC-SHA256 of "v0:<timestamp>:<body>" with the app's signing secret),
computed here, never with the project's own code."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from urllib.parse import urlencode


def button_press(action_id: str, user_id: str, value: str) -> bytes:
    """The form body Slack posts when `user_id` presses the button `action_id`."""
    payload = {
        "type": "block_actions",
        "user": {"id": user_id, "username": user_id.lower(), "team_id": "T0001"},
        "team": {"id": "T0001"},
        "response_url": "https://hooks.slack.com/actions/T0001/1/abc",
        "actions": [
            {
                "type": "button",
                "action_id": action_id,
                "block_id": "elice_approval",
                "value": value,
                "action_ts": "1700000000.000100",
            }
        ],
    }
    return urlencode({"payload": json.dumps(payload)}).encode()


def slack_signed(body: bytes, secret: str, at: int | None = None) -> dict[str, str]:
    """The headers Slack sends with `body`, signed with `secret` at `at` (default: now)."""
    timestamp = str(int(time.time()) if at is None else at)
    base = b"v0:" + timestamp.encode() + b":" + body
    signature = "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()
    return {
        "X-Slack-Request-Timestamp": timestamp,
        "X-Slack-Signature": signature,
        "Content-Type": "application/x-www-form-urlencoded",
    }

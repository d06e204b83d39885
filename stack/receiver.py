"""The Slack receiver as a part of the stack (the daemon itself: daemons/slack_receiver.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from blocks.stack import StackInfo
from core.trust import TRUST_FILE_ENV
from stack.ports import recorded_port
from stack.serve import ensure_served
from stack.steps import Steps
from stack.supervisor import environ, running_part
from stack.worker import trust_file

DEFAULT_SLACK_RECEIVER_PORT = 3000


def ensure_slack_receiver(
    home: Path, previous: StackInfo | None, api_url: str, steps: Steps, auth: str | None = None
) -> str:
    """The receiver of Slack's Approve / Reject buttons (`daemons/slack_receiver.py`), on
    loopback, reading the signing secret and the Slack users where the gate does: the
    server's Secret block and the protected branch's approval policy. `auth`: the server's
    auth string, in the receiver's environment (a running receiver without it restarts)."""
    env = {"PREFECT_API_URL": api_url}
    if auth is not None:
        env["PREFECT_API_AUTH_STRING"] = auth  # the environment, never argv
    if trust_file(home).is_file():  # the policy's repository: the one the worker pins
        env[TRUST_FILE_ENV] = str(trust_file(home))
    pid = running_part(home, "slack-receiver")
    running = environ(pid) if pid is not None else {}
    changed = pid is not None and any(running.get(k) != v for k, v in env.items())

    def command(port: int) -> tuple[list[str], dict[str, str]]:
        args = [sys.executable, "-m", "daemons.slack_receiver", "--port", str(port)]
        return [*args, "--from-prefect"], env

    port = ensure_served(
        home,
        "slack-receiver",
        "Slack receiver",
        recorded_port(previous.slack_receiver_url if previous else None),
        DEFAULT_SLACK_RECEIVER_PORT,
        changed,
        command,
        30,
        steps,
    )
    url = f"http://127.0.0.1:{port}"
    steps.info("slack-receiver", f"Slack's request URL: {url}/slack/actions behind HTTPS")
    return url

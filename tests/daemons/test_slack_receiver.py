"""The Slack receiver, running, against requests signed exactly as Slack documents.

The signatures here are computed from Slack's documentation (HMAC-SHA256 of
"v0:<timestamp>:<body>" with the signing secret), not with the receiver's own code.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prefect.settings import PREFECT_API_URL
from pydantic import SecretStr

from core.errors import GateError
from daemons.slack_receiver import ACTIONS_PATH, SECRET_ENV, SlackReceiver, load_slack_users
from tasks.slack_actions import APPROVE_ACTION, REJECT_ACTION, SlackDecision
from tests.slack_requests import button_press, slack_signed

SIGNING_SECRET = "e3b0c44298fc1c149afbf4c8996fb924-signing"
RUN_ID = "0b6f3c52-8d0e-4a43-9a53-6d8a2b1f0c11"
RELEASE = "3f9a0c1b2d4e"
USERS = {"U0ALICE01": "alice", "U0BOB0002": "bob"}
REPO = Path(__file__).resolve().parents[2]


def press(action_id: str = APPROVE_ACTION, user_id: str = "U0ALICE01") -> bytes:
    """The form body Slack posts when a button is pressed."""
    return button_press(action_id, user_id, json.dumps({"run_id": RUN_ID, "release_id": RELEASE}))


def signed(body: bytes, *, secret: str = SIGNING_SECRET, at: int | None = None) -> dict[str, str]:
    return slack_signed(body, secret, at)


class Recorder:
    """An `on_decision` that records what it was asked, and can be told to fail."""

    def __init__(self) -> None:
        self.calls: list[tuple[SlackDecision, str]] = []
        self.fail: Exception | None = None

    def __call__(self, decision: SlackDecision, approver: str) -> str:
        if self.fail is not None:
            raise self.fail
        self.calls.append((decision, approver))
        return f"{decision.action} by {approver} recorded"


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def receiver(recorder: Recorder) -> Iterator[SlackReceiver]:
    running = SlackReceiver(SecretStr(SIGNING_SECRET), USERS, recorder).start()
    try:
        yield running
    finally:
        running.stop()


def post(receiver: SlackReceiver, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(receiver.url + ACTIONS_PATH, content=body, headers=headers, timeout=10)


def test_a_signed_press_by_a_known_user_is_handed_on(
    receiver: SlackReceiver, recorder: Recorder
) -> None:
    body = press(REJECT_ACTION, "U0BOB0002")
    answer = post(receiver, body, signed(body))
    assert (answer.status_code, answer.text) == (200, "reject by bob recorded\n")
    ((decision, approver),) = recorder.calls
    assert approver == "bob"
    assert (decision.action, decision.run_id, decision.user_id) == ("reject", RUN_ID, "U0BOB0002")
    assert decision.release_id == "3f9a0c1b2d4e"


def test_a_bad_signature_is_401(receiver: SlackReceiver, recorder: Recorder) -> None:
    body = press()
    forged = post(receiver, body, signed(body, secret="not-the-secret"))
    assert forged.status_code == 401
    assert "not signed by Slack" in forged.text
    other_body = press(REJECT_ACTION)
    swapped = post(receiver, other_body, signed(body))  # a real signature, another body
    assert swapped.status_code == 401
    unsigned = post(receiver, body, {"Content-Type": "application/x-www-form-urlencoded"})
    assert unsigned.status_code == 401
    assert recorder.calls == []


def test_a_stale_timestamp_is_401(receiver: SlackReceiver, recorder: Recorder) -> None:
    body = press()
    stale = post(receiver, body, signed(body, at=int(time.time()) - 6 * 60))
    assert stale.status_code == 401
    assert "more than 300s" in stale.text
    future = post(receiver, body, signed(body, at=int(time.time()) + 6 * 60))
    assert future.status_code == 401
    assert recorder.calls == []


def test_a_replay_is_401(receiver: SlackReceiver, recorder: Recorder) -> None:
    body = press()
    headers = signed(body)
    assert post(receiver, body, headers).status_code == 200
    replay = post(receiver, body, headers)
    assert replay.status_code == 401
    assert "replay" in replay.text
    assert len(recorder.calls) == 1


def test_an_unknown_user_is_403(receiver: SlackReceiver, recorder: Recorder) -> None:
    body = press(user_id="U0MALLORY")
    answer = post(receiver, body, signed(body))
    assert answer.status_code == 403
    assert "U0MALLORY" in answer.text
    assert recorder.calls == []


def test_a_signed_but_bad_payload_is_400(receiver: SlackReceiver, recorder: Recorder) -> None:
    body = press(action_id="open_flow_run")
    answer = post(receiver, body, signed(body))
    assert answer.status_code == 400
    assert "not an approval button" in answer.text
    garbage = b"payload=%7Bnot-json"
    assert post(receiver, garbage, signed(garbage)).status_code == 400
    assert recorder.calls == []


def test_handler_failures_answer_without_stopping_the_receiver(
    receiver: SlackReceiver, recorder: Recorder
) -> None:
    recorder.fail = GateError(f"run {RUN_ID} is not paused")
    body = press()
    refused = post(receiver, body, signed(body))
    assert (refused.status_code, refused.text) == (409, f"run {RUN_ID} is not paused\n")
    recorder.fail = RuntimeError("boom with details")
    body = press(REJECT_ACTION)
    crashed = post(receiver, body, signed(body))
    assert crashed.status_code == 500
    assert "boom" not in crashed.text
    recorder.fail = None
    body = press(user_id="U0BOB0002")
    assert post(receiver, body, signed(body)).status_code == 200


def test_other_requests(receiver: SlackReceiver) -> None:
    assert httpx.get(receiver.url + "/health").text == "ok\n"
    assert httpx.get(receiver.url + ACTIONS_PATH).status_code == 405
    body = press()
    assert httpx.post(receiver.url + "/other", content=body, headers=signed(body)).status_code == (
        404
    )
    big = b"x" * 70_000
    assert post(receiver, big, signed(big)).status_code == 413


def test_the_secret_is_never_logged(
    receiver: SlackReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    body = press()
    post(receiver, body, signed(body))
    post(receiver, body, signed(body, secret="wrong"))
    post(receiver, press(user_id="U0NOBODY"), signed(press(user_id="U0NOBODY")))
    assert "request from 127.0.0.1 refused (401)" in caplog.text
    assert "request from 127.0.0.1 refused (403)" in caplog.text
    assert SIGNING_SECRET not in caplog.text
    assert SIGNING_SECRET not in repr(receiver)


def test_an_empty_secret_is_refused_before_listening() -> None:
    with pytest.raises(ValueError, match=SECRET_ENV):
        SlackReceiver(SecretStr(""), USERS, Recorder())


def test_load_slack_users(tmp_path: Path) -> None:
    users = tmp_path / "users.yaml"
    users.write_text("slack_users:\n  U0ALICE01: alice\n")
    assert load_slack_users(users) == {"U0ALICE01": "alice"}
    users.write_text('{"U0BOB0002": "bob"}')
    assert load_slack_users(users) == {"U0BOB0002": "bob"}
    users.write_text("- alice\n")
    with pytest.raises(ValueError, match="mapping"):
        load_slack_users(users)


def _wait_for_line(proc: subprocess.Popen[str], prefix: str, timeout: float = 60) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line.strip()
        if not line and proc.poll() is not None:
            break
    pytest.fail(f"receiver did not print {prefix!r} (exit {proc.poll()})")


def test_module_entry_point(tmp_path: Path) -> None:
    users = tmp_path / "users.yaml"
    users.write_text("slack_users:\n  U0ALICE01: alice\n")
    # connected to the session's server, where no run RUN_ID waits
    env = {
        **os.environ,
        SECRET_ENV: SIGNING_SECRET,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
    }
    args = [sys.executable, "-m", "daemons.slack_receiver", "--port", "0", "--users", str(users)]
    stderr = tmp_path / "stderr.log"
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True
        )
        try:
            line = _wait_for_line(proc, "slack receiver listening on ")
            url = line.rsplit(" ", 1)[1]
            assert url.endswith(ACTIONS_PATH)
            body = press()
            answer = httpx.post(url, content=body, headers=signed(body), timeout=30)
            assert answer.status_code == 409, answer.text  # verified, then handed to the gate
            assert f"no flow run {RUN_ID}" in answer.text
            stranger = press(user_id="U0BOB0002")
            assert httpx.post(url, content=stranger, headers=signed(stranger)).status_code == 403
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    output = stderr.read_text()
    assert "not applied" in output
    assert SIGNING_SECRET not in output


def test_module_entry_point_without_secret(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    done = subprocess.run(
        [sys.executable, "-m", "daemons.slack_receiver", "--port", "0"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert SECRET_ENV in done.stderr

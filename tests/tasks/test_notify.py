"""Slack and PagerDuty notices against real local HTTP receivers."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import pytest
from prefect.states import State

from blocks.notifications import PAGERDUTY_BLOCK, SLACK_BLOCK, PagerDutyService, SlackChannel
from core.errors import NoticeUndeliverable
from core.records import ImageRef
from tasks.masking import scrub
from tasks.notify import (
    Notice,
    digest_change,
    notify,
    pagerduty_action,
    pagerduty_event,
    send_pagerduty,
    send_slack,
    slack_blocks,
)
from tests.plugins.receivers import Receiver, Reply

BOT_TOKEN = "xoxb-0000-SECRET-BOT-TOKEN-7f3a"
ROUTING_KEY = "R0UTINGKEYSECRET9b1c"
HOOK_SECRET = "HOOKSECRETc0ffee"


def _image(hexchar: str) -> ImageRef:
    return ImageRef(
        service="auth", repository="127.0.0.1:5000/elice/auth", digest="sha256:" + hexchar * 64
    )


def _notice(kind: str = "approval_needed", environment: str = "production") -> Notice:
    return Notice(
        kind=kind,  # type: ignore[arg-type]
        environment=environment,
        release_id="rel-42",
        services={
            "auth": digest_change(_image("a"), _image("b")),
            "media": digest_change(None, _image("c")),
        },
        flow_run_url="http://127.0.0.1:4200/runs/flow-run/1234",
        message="Promote rel-42 to production",
        cli_hint="cicd approve rel-42 --env production",
    )


def _slack(receiver: Receiver) -> SlackChannel:
    return SlackChannel(bot_token=BOT_TOKEN, channel="#deploys", base_url=receiver.slack_base_url)


def _pagerduty(receiver: Receiver) -> PagerDutyService:
    return PagerDutyService(routing_key=ROUTING_KEY, events_url=receiver.pagerduty_url)


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- pure builders ----------------------------------------------------------------------


def test_slack_blocks_have_header_fields_button_and_cli() -> None:
    blocks = slack_blocks(_notice())
    assert blocks[0]["type"] == "header"
    assert "Approval needed" in blocks[0]["text"]["text"]
    assert "production" in blocks[0]["text"]["text"]
    fields = next(b for b in blocks if "fields" in b)["fields"]
    assert {"type": "mrkdwn", "text": "*Release*\nrel-42"} in fields
    services = next(
        b for b in blocks if b["type"] == "section" and "auth" in b.get("text", {}).get("text", "")
    )
    assert "aaaaaaaaaaaa -> bbbbbbbbbbbb" in services["text"]["text"]
    assert "none -> cccccccccccc" in services["text"]["text"]
    (actions,) = [b for b in blocks if b["type"] == "actions"]
    assert actions["elements"][0]["url"] == "http://127.0.0.1:4200/runs/flow-run/1234"
    assert actions["elements"][0]["style"] == "primary"
    assert any(
        "cicd approve rel-42 --env production" in b.get("text", {}).get("text", "") for b in blocks
    )


def test_slack_blocks_without_url_or_hint() -> None:
    notice = Notice(kind="deployed", environment="dev", release_id="r1")
    blocks = slack_blocks(notice)
    assert not [b for b in blocks if b["type"] == "actions"]
    assert not any("From the CLI" in b.get("text", {}).get("text", "") for b in blocks)


def test_pagerduty_event_one_incident_per_environment() -> None:
    trigger = pagerduty_event(_notice("failed"), "k", "trigger")
    assert trigger["dedup_key"] == "elice-devops-production"
    assert trigger["payload"]["severity"] == "critical"
    assert "rel-42" in trigger["payload"]["summary"]
    assert trigger["payload"]["custom_details"]["release_id"] == "rel-42"
    assert trigger["links"][0]["href"].endswith("/runs/flow-run/1234")
    resolve = pagerduty_event(_notice("deployed"), "k", "resolve")
    assert resolve == {
        "routing_key": "k",
        "event_action": "resolve",
        "dedup_key": "elice-devops-production",
    }


def test_pagerduty_action_rules() -> None:
    assert pagerduty_action(_notice("failed")) == "trigger"
    assert pagerduty_action(_notice("rolled_back")) == "trigger"
    assert pagerduty_action(_notice("deployed")) == "resolve"
    assert pagerduty_action(_notice("approval_needed")) is None
    assert pagerduty_action(_notice("failed", environment="staging")) is None


def test_scrub_removes_plain_and_url_encoded_secrets() -> None:
    secret = "https://hooks.example/T/B/abc"
    text = f"failed {secret} and https%3A%2F%2Fhooks.example%2FT%2FB%2Fabc; {BOT_TOKEN}"
    cleaned = scrub(text, [secret, BOT_TOKEN, None, ""])
    assert secret not in cleaned
    assert "abc" not in cleaned
    assert BOT_TOKEN not in cleaned
    assert cleaned.count("***") == 3


def test_block_reprs_and_validation_errors_hide_secrets() -> None:
    assert BOT_TOKEN not in repr(SlackChannel(bot_token=BOT_TOKEN, channel="#c"))
    with pytest.raises(ValueError, match="bot_token needs a channel") as info:
        SlackChannel(bot_token=BOT_TOKEN)
    assert BOT_TOKEN not in str(info.value)
    with pytest.raises(ValueError, match="webhook_url must be") as info:
        SlackChannel(webhook_url=f"ftp://{HOOK_SECRET}")
    assert HOOK_SECRET not in str(info.value)
    with pytest.raises(ValueError, match="not both"):
        SlackChannel(bot_token=BOT_TOKEN, channel="#c", webhook_url="https://x/y")


# --- Slack delivery ---------------------------------------------------------------------


def test_send_slack_posts_blocks_with_bot_token(running_receiver: Receiver) -> None:
    status = send_slack(_notice(), _slack(running_receiver))
    assert status == "sent"
    (request,) = running_receiver.requests_to("/api/chat.postMessage")
    assert request.method == "POST"
    assert request.headers["authorization"] == f"Bearer {BOT_TOKEN}"
    body = request.payload()
    assert body["channel"] == "#deploys"
    assert "Approval needed" in body["text"]
    blocks = body["blocks"]
    assert blocks[0]["type"] == "header"
    assert any(b["type"] == "actions" for b in blocks)


def test_send_slack_honours_retry_after(running_receiver: Receiver) -> None:
    running_receiver.script(
        "chat.postMessage",
        Reply(429, {"ok": False, "error": "ratelimited"}, headers={"Retry-After": "1"}),
    )
    assert send_slack.fn(_notice(), _slack(running_receiver)) == "sent"
    first, second = running_receiver.requests_to("chat.postMessage")
    assert first.payload() == second.payload()


def test_send_slack_via_webhook(running_receiver: Receiver) -> None:
    channel = SlackChannel(webhook_url=running_receiver.webhook_url)
    assert send_slack.fn(_notice("deployed"), channel) == "sent"
    (request,) = running_receiver.requests_to("/services/T000/B000/XXXX")
    assert "Deployed" in request.json["text"]
    assert request.json["blocks"][0]["type"] == "header"


def test_send_slack_without_channel_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert send_slack(_notice(), None) == "skipped"
    assert "no channel configured" in caplog.text


def test_send_slack_retries_server_errors_then_delivers(running_receiver: Receiver) -> None:
    running_receiver.script(
        "chat.postMessage",
        Reply(500, {"ok": False, "error": "internal_error"}),
        Reply(503, {"ok": False, "error": "service_unavailable"}),
    )
    quick = send_slack.with_options(retries=3, retry_delay_seconds=0)
    assert quick(_notice(), _slack(running_receiver)) == "sent"
    assert len(running_receiver.requests_to("chat.postMessage")) == 3


def test_send_slack_gives_up_quietly(running_receiver: Receiver) -> None:
    running_receiver.script(
        "chat.postMessage", *[Reply(500, {"ok": False, "error": "internal_error"})] * 2
    )
    quick = send_slack.with_options(retries=1, retry_delay_seconds=0)
    assert quick(_notice(), _slack(running_receiver)) == "failed"
    assert len(running_receiver.requests_to("chat.postMessage")) == 2


def test_send_slack_does_not_retry_configuration_errors(running_receiver: Receiver) -> None:
    running_receiver.script(
        "chat.postMessage", Reply(200, {"ok": False, "error": "channel_not_found"})
    )
    quick = send_slack.with_options(retries=3, retry_delay_seconds=0)
    assert quick(_notice(), _slack(running_receiver)) == "failed"
    assert len(running_receiver.requests_to("chat.postMessage")) == 1


def test_send_slack_unreachable_is_failed_not_raised() -> None:
    channel = SlackChannel(
        bot_token=BOT_TOKEN, channel="#c", base_url=f"http://127.0.0.1:{_dead_port()}/api/"
    )
    assert send_slack.fn(_notice(), channel) == "failed"


# --- PagerDuty delivery -----------------------------------------------------------------


def test_send_pagerduty_trigger_and_resolve(running_receiver: Receiver) -> None:
    service = _pagerduty(running_receiver)
    assert send_pagerduty(_notice("failed"), service, "trigger") == "sent"
    assert send_pagerduty(_notice("deployed"), service, "resolve") == "sent"
    trigger, resolve = running_receiver.requests_to("/v2/enqueue")
    assert trigger.json["event_action"] == "trigger"
    assert trigger.json["routing_key"] == ROUTING_KEY
    assert trigger.json["dedup_key"] == resolve.json["dedup_key"] == "elice-devops-production"
    assert (
        trigger.json["payload"]["custom_details"]["services"]["auth"]
        == "aaaaaaaaaaaa -> bbbbbbbbbbbb"
    )
    assert resolve.json["event_action"] == "resolve"
    assert "payload" not in resolve.json


def test_send_pagerduty_rejects_bad_action_before_sending(running_receiver: Receiver) -> None:
    with pytest.raises(ValueError, match="trigger"):
        send_pagerduty.fn(_notice(), _pagerduty(running_receiver), "acknowledge")  # type: ignore[arg-type]
    assert running_receiver.requests == []


def test_send_pagerduty_without_service_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert send_pagerduty.fn(_notice("failed"), None, "trigger") == "skipped"
    assert "no service configured" in caplog.text


def test_secrets_never_reach_logs_states_or_exceptions(
    running_receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """A receiver that echoes the secrets back in its error bodies, on every channel."""
    running_receiver.script(
        "/v2/enqueue",
        Reply(500, {"status": "error", "echo": ROUTING_KEY}),
        Reply(400, {"status": "invalid event", "errors": [f"bad key {ROUTING_KEY}"]}),
    )
    hook_url = f"{running_receiver.url}/services/T1/B1/{HOOK_SECRET}"
    running_receiver.script(f"/{HOOK_SECRET}", Reply(500, body=f"no such hook {hook_url}".encode()))
    running_receiver.script(
        "chat.postMessage", Reply(200, {"ok": False, "error": "invalid_auth", "echo": BOT_TOKEN})
    )
    caplog.set_level(logging.DEBUG)

    pd_task = send_pagerduty.with_options(retries=1, retry_delay_seconds=0)
    state = pd_task(_notice("failed"), _pagerduty(running_receiver), "trigger", return_state=True)
    assert state.is_completed()
    assert state.result() == "failed"
    assert send_slack.fn(_notice(), SlackChannel(webhook_url=hook_url)) == "failed"
    assert send_slack.fn(_notice(), _slack(running_receiver)) == "failed"
    assert len(running_receiver.requests) == 4

    # The first PagerDuty attempt raised (to be retried): Prefect logged that exception.
    assert "NoticeUndeliverable('pagerduty answered 500" in caplog.text
    assert "pagerduty answered 400" in caplog.text
    assert "slack webhook answered 500" in caplog.text
    assert "invalid_auth" in caplog.text
    for secret in (ROUTING_KEY, HOOK_SECRET, BOT_TOKEN):
        assert secret not in caplog.text

    # Exception text: a transient failure inside a run with retries left raises, scrubbed.
    running_receiver.script("/v2/enqueue", Reply(503, {"echo": ROUTING_KEY}))
    raised: list[BaseException] = []

    def capture(task: object, task_run: object, state: State) -> bool:
        raised.append(state.result(raise_on_failure=False))
        return True

    raising = send_pagerduty.with_options(
        retries=1, retry_delay_seconds=0, retry_condition_fn=capture
    )
    assert raising(_notice("failed"), _pagerduty(running_receiver), "trigger") == "sent"
    (error,) = raised
    assert isinstance(error, NoticeUndeliverable)
    assert "pagerduty answered 503" in str(error)
    assert ROUTING_KEY not in str(error)
    assert ROUTING_KEY not in repr(error)
    assert error.__cause__ is None
    assert error.__suppress_context__


# --- notify: channel routing with saved blocks -------------------------------------------


@pytest.fixture
def saved_channels(running_receiver: Receiver) -> Iterator[Receiver]:
    _slack(running_receiver).save(SLACK_BLOCK, overwrite=True)
    _pagerduty(running_receiver).save(PAGERDUTY_BLOCK, overwrite=True)
    try:
        yield running_receiver
    finally:
        SlackChannel.delete(SLACK_BLOCK)
        PagerDutyService.delete(PAGERDUTY_BLOCK)


def test_notify_pages_production_failures_and_resolves_on_deploy(saved_channels: Receiver) -> None:
    assert notify(_notice("failed")) == {"slack": "sent", "pagerduty": "sent"}
    assert notify(_notice("deployed")) == {"slack": "sent", "pagerduty": "sent"}
    assert notify(_notice("approval_needed")) == {"slack": "sent"}
    assert notify(_notice("rolled_back", environment="staging")) == {"slack": "sent"}
    actions = [r.json["event_action"] for r in saved_channels.requests_to("/v2/enqueue")]
    assert actions == ["trigger", "resolve"]
    assert len(saved_channels.requests_to("chat.postMessage")) == 4


def test_notify_without_configuration_skips(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        result = notify(_notice("failed"))
    assert result == {"slack": "skipped", "pagerduty": "skipped"}
    assert notify(_notice("rolled_back"), slack=None, pagerduty=None) == {
        "slack": "skipped",
        "pagerduty": "skipped",
    }


# --- secrets echoed in parts ------------------------------------------------------------


def test_scrub_removes_the_secret_parts_of_a_webhook_url() -> None:
    url = f"https://hooks.slack.com/services/T0ABC/B0DEF/{HOOK_SECRET}?token=Q{HOOK_SECRET}"
    for echoed in (
        f"404 no_service for POST /services/T0ABC/B0DEF/{HOOK_SECRET}",
        f"unknown hook T0ABC/B0DEF/{HOOK_SECRET}",
        f"unknown hook %2Fservices%2FT0ABC%2FB0DEF%2F{HOOK_SECRET}",
        f"path=/services/T0ABC/B0DEF/{HOOK_SECRET}?token=Q{HOOK_SECRET} refused",
        f"bad token: Q{HOOK_SECRET}",
    ):
        cleaned = scrub(echoed, [url])
        assert HOOK_SECRET not in cleaned, cleaned
        assert "***" in cleaned
    # The words around a secret stay readable: only the secret segments go.
    assert scrub("POST /services/ failed: services down", [url]) == (
        "POST /services/ failed: services down"
    )


@pytest.mark.parametrize("status", [404, 500])
def test_webhook_path_echoed_by_the_endpoint_never_reaches_the_logs(
    running_receiver: Receiver, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    """Slack answers an unknown hook with its path; an endpoint may echo the query too."""
    path = f"/services/T0ABC/B0DEF/{HOOK_SECRET}"
    query = f"token=Q{HOOK_SECRET}"
    hook_url = f"{running_receiver.url}{path}?{query}"
    echo = f"no_service: POST {path}?{query} (hook {path.rsplit('/', 1)[1]})"
    running_receiver.script(f"/{HOOK_SECRET}", *[Reply(status, body=echo.encode())] * 2)
    caplog.set_level(logging.DEBUG)

    quick = send_slack.with_options(retries=1, retry_delay_seconds=0)
    state = quick(_notice(), SlackChannel(webhook_url=hook_url), return_state=True)

    assert state.result() == "failed"
    (request, *_) = running_receiver.requests_to(path)
    assert request.query == {"token": f"Q{HOOK_SECRET}"}  # the endpoint did see it all
    assert f"slack webhook answered {status}" in caplog.text
    assert "no_service: POST ***" in caplog.text
    assert HOOK_SECRET not in caplog.text

"""Notices to people: Slack messages (Block Kit) and PagerDuty incidents (Events API v2).

A notice never changes a pipeline's outcome: missing configuration is a warning
("skipped"), an undeliverable notice is retried by the task, then logged and swallowed
("failed"). Secrets (bot token, webhook URL, routing key) are scrubbed from everything
that is logged or raised.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any, Literal

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.runtime import flow_run
from prefect.settings import PREFECT_UI_URL
from prefect.tasks import exponential_backoff
from pydantic import BaseModel, ConfigDict, Field
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.http_retry import ConnectionErrorRetryHandler, RateLimitErrorRetryHandler
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.web import WebClient
from slack_sdk.webhook import WebhookClient

from blocks.environments import PAGED_BY_NAME
from blocks.notifications import (
    PagerDutyService,
    SlackChannel,
    load_pagerduty_service,
    load_slack_channel,
)
from core.errors import NoticeUndeliverable, PipelineError
from core.records import ImageRef, PromotionPlan, short_digest
from core.settings import Settings
from tasks.masking import scrub
from tasks.process import run_logger
from tasks.slack_actions import with_approval_actions
from tasks.trusted import pipeline_config

NoticeKind = Literal[
    "approval_needed", "deployed", "rolled_back", "failed", "refused", "rejected", "healthy"
]
DeliveryStatus = Literal["sent", "skipped", "failed"]
PagerDutyAction = Literal["trigger", "resolve"]

MAX_RETRY_AFTER_S = 60
TIMEOUT_S = 10

_TITLES: dict[str, tuple[str, str]] = {
    "approval_needed": (":hourglass_flowing_sand:", "Approval needed"),
    "deployed": (":white_check_mark:", "Deployed"),
    "rolled_back": (":rewind:", "Rolled back"),
    "failed": (":x:", "Release failed"),
    "refused": (":no_entry:", "Promotion refused"),
    "rejected": (":no_entry_sign:", "Promotion rejected"),
    "healthy": (":green_heart:", "Healthy"),
}
_PD_SEVERITY = {"failed": "critical", "rolled_back": "error"}
# Slack API errors that no retry can fix: the configuration is wrong.
_SLACK_PERMANENT = {
    "invalid_auth",
    "not_authed",
    "account_inactive",
    "token_revoked",
    "token_expired",
    "channel_not_found",
    "not_in_channel",
    "is_archived",
    "invalid_arguments",
    "invalid_blocks",
    "missing_scope",
    "no_permission",
    "invalid_token",
}

# The SDK logs request URLs at DEBUG (a webhook URL is a secret): keep its logger quiet.
_SDK_LOGGER = logging.getLogger("elice.notify.slack_sdk")
_SDK_LOGGER.setLevel(logging.WARNING)


class Notice(BaseModel):
    """Something people should hear about a release."""

    model_config = ConfigDict(frozen=True)

    kind: NoticeKind
    environment: str = Field(min_length=1)
    release_id: str = Field(default="", description="The promotion's release id")
    services: dict[str, str] = Field(
        default_factory=dict, description="service -> 'old12hex -> new12hex'"
    )
    flow_run_url: str | None = Field(default=None, description="The run in the Prefect UI")
    message: str = Field(default="", description="What happened, in a sentence or two")
    cli_hint: str | None = Field(default=None, description="e.g. the `cicd approve ...` command")
    run_id: str | None = Field(
        default=None, description="approval_needed: the paused run (its Slack buttons name it)"
    )


# --- pure helpers -----------------------------------------------------------------------


def digest_change(old: ImageRef | None, new: ImageRef | None) -> str:
    """'old12hex -> new12hex' for a notice ('none' where there is no image)."""
    return f"{old.short if old else 'none'} -> {new.short if new else 'none'}"


def plan_changes(plan: PromotionPlan | None) -> dict[str, str]:
    """service -> 'old12hex -> new12hex' of every change of `plan` (none without a plan)."""
    if plan is None:
        return {}
    return {
        c.service: f"{short_digest(c.current_digest) if c.current_digest else 'none'}"
        f" -> {c.image.short}"
        for c in plan.changes
    }


def notice_title(notice: Notice) -> str:
    """One line: what happened where."""
    emoji, title = _TITLES[notice.kind]
    release = f" ({notice.release_id})" if notice.release_id else ""
    return f"{emoji} {title}: {notice.environment}{release}"


def notice_text(notice: Notice) -> str:
    """Plain-text fallback (notifications, screen readers, webhooks without blocks)."""
    lines = [notice_title(notice)]
    if notice.message:
        lines.append(notice.message)
    lines += [f"{svc}: {change}" for svc, change in sorted(notice.services.items())]
    if notice.flow_run_url:
        lines.append(f"Run: {notice.flow_run_url}")
    if notice.cli_hint:
        lines.append(f"CLI: {notice.cli_hint}")
    return "\n".join(lines)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def slack_blocks(notice: Notice) -> list[dict[str, Any]]:
    """Block Kit blocks: header, fields, services, the run's link and the CLI command."""
    blocks: list[dict[str, Any]] = [
        {
            "type": "header",
            "text": {"type": "plain_text", "text": _clip(notice_title(notice), 150), "emoji": True},
        }
    ]
    if notice.message:
        blocks.append(
            {"type": "section", "text": {"type": "mrkdwn", "text": _clip(notice.message, 3000)}}
        )
    fields = [
        {"type": "mrkdwn", "text": f"*Environment*\n{notice.environment}"},
        {"type": "mrkdwn", "text": f"*Release*\n{notice.release_id or '-'}"},
        {"type": "mrkdwn", "text": f"*Event*\n{notice.kind.replace('_', ' ')}"},
        {"type": "mrkdwn", "text": f"*Services*\n{len(notice.services)}"},
    ]
    blocks.append({"type": "section", "fields": fields})
    if notice.services:
        rows = [f"• *{svc}*  `{change}`" for svc, change in sorted(notice.services.items())]
        blocks.append(
            {"type": "section", "text": {"type": "mrkdwn", "text": _clip("\n".join(rows), 3000)}}
        )
    if notice.flow_run_url and notice.flow_run_url.startswith(("http://", "https://")):
        button: dict[str, Any] = {
            "type": "button",
            "text": {"type": "plain_text", "text": "Open the run in Prefect"},
            "url": notice.flow_run_url,
            "action_id": "open_flow_run",
        }
        if notice.kind == "approval_needed":
            button["style"] = "primary"
        blocks.append({"type": "actions", "elements": [button]})
    if notice.cli_hint:
        blocks.append(
            {
                "type": "section",
                "text": {
                    "type": "mrkdwn",
                    "text": _clip(f"*From the CLI*\n```{notice.cli_hint}```", 3000),
                },
            }
        )
    blocks.append(
        {"type": "context", "elements": [{"type": "mrkdwn", "text": "elice-devops · Prefect"}]}
    )
    if notice.kind == "approval_needed" and notice.run_id and notice.release_id:
        blocks = with_approval_actions(blocks, notice.run_id, notice.release_id, notice.environment)
    return blocks


def pagerduty_event(notice: Notice, routing_key: str, action: PagerDutyAction) -> dict[str, Any]:
    """The Events API v2 body: one incident per environment (dedup_key), release in details."""
    event: dict[str, Any] = {
        "routing_key": routing_key,
        "event_action": action,
        "dedup_key": f"elice-devops-{notice.environment}",
    }
    if action == "resolve":
        return event
    summary = (
        f"{notice_title(notice)}: {notice.message}" if notice.message else notice_title(notice)
    )
    event["client"] = "elice-devops"
    event["payload"] = {
        "summary": _clip(summary.replace("\n", " "), 1024),
        "source": f"elice-devops/{notice.environment}",
        "severity": _PD_SEVERITY.get(notice.kind, "warning"),
        "component": ",".join(sorted(notice.services)) or None,
        "group": notice.environment,
        "class": notice.kind,
        "custom_details": {
            "release_id": notice.release_id,
            "services": dict(sorted(notice.services.items())),
            "message": notice.message,
            "cli_hint": notice.cli_hint,
        },
    }
    if notice.flow_run_url:
        event["client_url"] = notice.flow_run_url
        event["links"] = [{"href": notice.flow_run_url, "text": "Prefect flow run"}]
    return event


# --- delivery ---------------------------------------------------------------------------


class _BoundedRateLimitRetryHandler(RateLimitErrorRetryHandler):
    """Honours 429 Retry-After, but leaves long waits to the task's own retries."""

    def _can_retry(self, *, response: HttpResponse | None = None, **_: Any) -> bool:
        if response is None or response.status_code != 429:
            return False
        for name, values in response.headers.items():
            if name.lower() == "retry-after" and values:
                try:
                    return int(values[0]) <= MAX_RETRY_AFTER_S
                except ValueError:
                    return True
        return True


def _retry_handlers() -> list[Any]:
    return [
        ConnectionErrorRetryHandler(max_retry_count=2),
        _BoundedRateLimitRetryHandler(max_retry_count=3),
    ]


def _post_slack(notice: Notice, channel: SlackChannel) -> None:
    text, blocks = notice_text(notice), slack_blocks(notice)
    try:
        if channel.webhook_url is not None:
            hook = WebhookClient(
                url=channel.webhook_url.get_secret_value(),
                timeout=TIMEOUT_S,
                logger=_SDK_LOGGER,
                retry_handlers=_retry_handlers(),
            )
            answer = hook.send(text=text, blocks=blocks)
            if answer.status_code != 200:
                raise NoticeUndeliverable(
                    f"slack webhook answered {answer.status_code}: {answer.body[:200]}",
                    transient=answer.status_code == 429 or answer.status_code >= 500,
                )
            return
        assert channel.bot_token is not None  # noqa: S101 - SlackChannel's validator
        client = WebClient(
            token=channel.bot_token.get_secret_value(),
            base_url=channel.base_url,
            timeout=TIMEOUT_S,
            logger=_SDK_LOGGER,
            retry_handlers=_retry_handlers(),
        )
        client.chat_postMessage(channel=channel.channel or "", text=text, blocks=blocks)
    except SlackApiError as exc:
        status = getattr(exc.response, "status_code", 0)
        data = getattr(exc.response, "data", None)
        error = data.get("error", "") if isinstance(data, dict) else ""
        transient = status == 429 or status >= 500 or error not in _SLACK_PERMANENT
        # from None: the SDK's error repeats the request, webhook URL or token included.
        raise NoticeUndeliverable(
            f"slack chat.postMessage failed: HTTP {status} {error or 'no error code'}",
            transient=transient,
        ) from None
    except (SlackClientError, OSError, ValueError) as exc:
        # from None: the cause may carry the webhook URL; the message is scrubbed later.
        raise NoticeUndeliverable(
            f"slack unreachable: {type(exc).__name__}: {exc}", transient=True
        ) from None


def _post_pagerduty(notice: Notice, service: PagerDutyService, action: PagerDutyAction) -> None:
    body = pagerduty_event(notice, service.routing_key.get_secret_value(), action)
    transport = httpx.HTTPTransport(retries=2)  # connection failures only
    try:
        with httpx.Client(timeout=TIMEOUT_S, transport=transport) as client:
            answer = client.post(service.events_url, json=body)
    except httpx.HTTPError as exc:
        # from None: the cause holds the request, routing key included.
        raise NoticeUndeliverable(
            f"pagerduty unreachable: {type(exc).__name__}: {exc}", transient=True
        ) from None
    if answer.status_code != 202:
        raise NoticeUndeliverable(
            f"pagerduty answered {answer.status_code}: {answer.text[:300]}",
            transient=answer.status_code == 429 or answer.status_code >= 500,
        )


def _retry_pending(task_name: str) -> bool:
    """True inside a run of `task_name` that has retries left (so raising retries it)."""
    ctx = TaskRunContext.get()
    if ctx is None or ctx.task.name != task_name:
        return False
    return ctx.task_run.run_count <= ctx.task.retries


def _deliver(
    what: str, task_name: str, secrets: list[str], send: Any, *args: Any
) -> DeliveryStatus:
    log = run_logger()
    try:
        send(*args)
    except NoticeUndeliverable as exc:
        message = scrub(str(exc), secrets)
        if exc.transient and _retry_pending(task_name):
            # from None: `exc` is the unscrubbed message; only the scrubbed one may travel.
            raise NoticeUndeliverable(message, transient=True) from None
        log.error("%s: notice not delivered, giving up: %s", what, message)  # noqa: TRY400
        return "failed"
    log.info("%s: notice delivered", what)
    return "sent"


RETRIES = 3
RETRY_DELAYS = exponential_backoff(backoff_factor=2)(RETRIES)  # 2, 4, 8 s


@task(
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_jitter_factor=0.5,
    cache_policy=NO_CACHE,
)
def send_slack(notice: Notice, channel: SlackChannel | None) -> DeliveryStatus:
    """Post `notice` to Slack; "skipped" without a channel, "failed" when undeliverable."""
    if channel is None:
        run_logger().warning("slack: no channel configured, %s notice not sent", notice.kind)
        return "skipped"
    return _deliver("slack", "send_slack", channel.secrets(), _post_slack, notice, channel)


@task(
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_jitter_factor=0.5,
    cache_policy=NO_CACHE,
)
def send_pagerduty(
    notice: Notice, service: PagerDutyService | None, action: PagerDutyAction = "trigger"
) -> DeliveryStatus:
    """Trigger or resolve the environment's PagerDuty incident.

    Raises:
        ValueError: unknown action (before anything is sent).
    """
    if action not in ("trigger", "resolve"):
        msg = f"action must be 'trigger' or 'resolve', got {action!r}"
        raise ValueError(msg)
    if service is None:
        run_logger().warning("pagerduty: no service configured, %s not sent", action)
        return "skipped"
    return _deliver(
        f"pagerduty {action}",
        "send_pagerduty",
        service.secrets(),
        _post_pagerduty,
        notice,
        service,
        action,
    )


def pagerduty_action(
    notice: Notice, paged: Collection[str] = PAGED_BY_NAME
) -> PagerDutyAction | None:
    """Trigger on failure or rollback, resolve on a good deploy or a healthy check, in paged
    environments only."""
    if notice.environment not in paged:
        return None
    if notice.kind in ("failed", "rolled_back"):
        return "trigger"
    if notice.kind in ("deployed", "healthy"):
        return "resolve"
    return None


def paged_environment(
    environment: str, settings: Settings, config_source: str | None = None
) -> tuple[str, bool]:
    """The environment's own name (seed aliases resolved), and whether its failures page.

    Production always pages; so does any environment behind an approval gate. An
    environment the configuration does not know keeps its name and pages by name only.
    """
    try:
        env = pipeline_config(settings, config_source).environments.resolve(environment)
    except PipelineError:  # unknown, or unreadable: page by name
        return environment, environment in PAGED_BY_NAME
    return env.name, env.paged


def notify(
    notice: Notice,
    *,
    slack: SlackChannel | Literal["saved"] | None = "saved",
    pagerduty: PagerDutyService | Literal["saved"] | None = "saved",
    paged: Collection[str] = PAGED_BY_NAME,
) -> dict[str, DeliveryStatus]:
    """Send `notice` everywhere it belongs: Slack always, PagerDuty per `pagerduty_action`.

    "saved" loads the blocks "elice-slack" / "elice-pagerduty". Never raises: a notice
    must not mask the pipeline's outcome. Returns channel -> status.
    """
    log = run_logger()
    results: dict[str, DeliveryStatus] = {}
    action = pagerduty_action(notice, paged)
    # Notices must never fail the caller (often a failure hook): contain everything.
    try:
        channel = load_slack_channel() if slack == "saved" else slack
        results["slack"] = send_slack(notice, channel)
    except Exception as exc:  # noqa: BLE001
        log.warning("slack: notice not sent: %s", type(exc).__name__)
        results["slack"] = "failed"
    if action is not None:
        try:
            service = load_pagerduty_service() if pagerduty == "saved" else pagerduty
            results["pagerduty"] = send_pagerduty(notice, service, action)
        except Exception as exc:  # noqa: BLE001
            log.warning("pagerduty: notice not sent: %s", type(exc).__name__)
            results["pagerduty"] = "failed"
    return results


def flow_run_url(flow_run_id: str | None = None) -> str | None:
    """The Prefect UI link of a flow run (default: the current one), None without a UI URL."""
    ui = PREFECT_UI_URL.value()
    if flow_run_id is None:
        flow_run_id = flow_run.id
    if not ui or not flow_run_id:
        return None
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}"

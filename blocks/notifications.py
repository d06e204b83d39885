"""Notification channels: Slack (bot token + channel, or incoming webhook) and PagerDuty."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator

SLACK_BLOCK = "elice-slack"
PAGERDUTY_BLOCK = "elice-pagerduty"


class SlackChannel(Block):
    """Where Slack notices go: a bot token and a channel, or an incoming webhook URL."""

    # Validation errors must not echo the raw input: it holds the secrets.
    model_config = ConfigDict(hide_input_in_errors=True)

    _block_type_name = "Elice Slack Channel"
    _description = "Slack notices: bot token + channel (chat.postMessage) or an incoming webhook."

    bot_token: SecretStr | None = Field(default=None, description="Bot token (xoxb-...)")
    channel: str | None = Field(default=None, description="Channel id or #name (with bot_token)")
    webhook_url: SecretStr | None = Field(
        default=None, description="Incoming webhook URL (instead of bot_token + channel)"
    )
    base_url: str = Field(
        default="https://slack.com/api/", description="Slack Web API base URL (tests override it)"
    )

    @field_validator("base_url")
    @classmethod
    def _slash(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            msg = f"base_url must be an http(s) URL, got {value!r}"
            raise ValueError(msg)
        return value if value.endswith("/") else value + "/"

    @model_validator(mode="after")
    def _one_way(self) -> SlackChannel:
        bot = self.bot_token is not None
        if bot == (self.webhook_url is not None):
            msg = "configure either bot_token + channel or webhook_url, not both and not neither"
            raise ValueError(msg)
        if bot and not self.channel:
            msg = "bot_token needs a channel"
            raise ValueError(msg)
        if self.webhook_url is not None and not self.webhook_url.get_secret_value().startswith(
            ("http://", "https://")
        ):
            msg = "webhook_url must be an http(s) URL"
            raise ValueError(msg)
        return self

    def secrets(self) -> list[str]:
        """The secret values, for scrubbing them out of messages."""
        return [s.get_secret_value() for s in (self.bot_token, self.webhook_url) if s is not None]


class PagerDutyService(Block):
    """A PagerDuty service reached through an Events API v2 integration."""

    # Validation errors must not echo the raw input: it holds the secrets.
    model_config = ConfigDict(hide_input_in_errors=True)

    _block_type_name = "Elice PagerDuty Service"
    _description = "PagerDuty Events API v2: routing (integration) key and endpoint."

    routing_key: SecretStr = Field(description="Integration key of the service's Events v2 API")
    events_url: str = Field(
        default="https://events.pagerduty.com/v2/enqueue",
        description="Events API v2 endpoint (tests override it)",
    )

    @field_validator("routing_key")
    @classmethod
    def _key(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            msg = "routing_key is empty"
            raise ValueError(msg)
        return value

    @field_validator("events_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            msg = f"events_url must be an http(s) URL, got {value!r}"
            raise ValueError(msg)
        return value

    def secrets(self) -> list[str]:
        """The secret values, for scrubbing them out of messages."""
        return [self.routing_key.get_secret_value()]


def load_slack_channel(name: str = SLACK_BLOCK) -> SlackChannel | None:
    """The saved Slack channel, None when no block of that name is saved (not configured)."""
    try:
        block = SlackChannel.load(name)
    except ValueError:
        return None
    return block if isinstance(block, SlackChannel) else None


def load_pagerduty_service(name: str = PAGERDUTY_BLOCK) -> PagerDutyService | None:
    """The saved PagerDuty service, None when no block of that name is saved."""
    try:
        block = PagerDutyService.load(name)
    except ValueError:
        return None
    return block if isinstance(block, PagerDutyService) else None

"""Deploy windows: when an environment is frozen, as pure policy over a given instant.

An environment's windows live in the approval policy on the protected branch
(`config/approvals.yaml`, `deploy_windows: {ENV: ...}`, read by `blocks/approvals.py`), so
changing a freeze takes a reviewed commit like changing who approves. This module only
evaluates them: `frozen_at(windows, now)` says which freeze holds at `now`, and nothing
here reads a clock; the caller passes the instant (`clock_now`: the ELICE_CLOCK setting
or the system's).

    freezes:  one-off periods, whole days from `start` to `end` (inclusive), local time
    weekly:   recurring hours on named weekdays; an `end` at or before `start` runs past
              midnight into the next day (the day named is the day the freeze starts)
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class DatedFreeze(BaseModel):
    """A one-off freeze: every day from `start` to `end`, both included, in the windows'
    time zone."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: date
    end: date
    reason: str = Field(min_length=1, max_length=200)

    @model_validator(mode="after")
    def _ordered(self) -> DatedFreeze:
        if self.end < self.start:
            msg = f"freeze {self.reason!r} ends ({self.end}) before it starts ({self.start})"
            raise ValueError(msg)
        return self


class WeeklyFreeze(BaseModel):
    """A recurring freeze: on each of `days`, from `start` to `end` local time."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    days: tuple[str, ...] = Field(min_length=1, description="mon..sun")
    start: time = Field(description="HH:MM local time")
    end: time = Field(description="HH:MM; at or before `start`: the next day's")
    reason: str = Field(min_length=1, max_length=200)

    @field_validator("days")
    @classmethod
    def _days(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        wrong = [d for d in value if d.lower() not in WEEKDAYS]
        if wrong:
            msg = f"days {wrong} are not weekdays ({', '.join(WEEKDAYS)})"
            raise ValueError(msg)
        return tuple(d.lower() for d in value)


class DeployWindows(BaseModel):
    """One environment's freezes, their time zone, and who may sign an override."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    time_zone: str = Field(default="UTC", description="IANA name, e.g. Asia/Seoul")
    freezes: tuple[DatedFreeze, ...] = ()
    weekly: tuple[WeeklyFreeze, ...] = ()
    override_approvers: tuple[str, ...] = Field(
        default=(),
        description="Who may sign an override (default: the environment's approvers)",
    )

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, value: str) -> str:
        zone_of(value)
        return value


class Freeze(BaseModel):
    """The freeze holding at an instant: why, and from when to when (local times)."""

    model_config = ConfigDict(frozen=True)

    reason: str
    starts: datetime
    ends: datetime

    def describe(self) -> str:
        """One line naming the freeze and its period, e.g. for a refusal."""
        zone = self.starts.tzname() or ""
        return (
            f"{self.reason!r} ({self.starts:%Y-%m-%d %H:%M} to {self.ends:%Y-%m-%d %H:%M} {zone})"
        )


def zone_of(name: str) -> ZoneInfo:
    """The time zone called `name`.

    Raises:
        ValueError: no such IANA time zone.
    """
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        msg = f"time_zone {name!r} is not an IANA time zone (e.g. Asia/Seoul, UTC)"
        raise ValueError(msg) from None


def _dated(freeze: DatedFreeze, local: datetime) -> Freeze | None:
    zone = local.tzinfo
    starts = datetime.combine(freeze.start, time(0), zone)
    ends = datetime.combine(freeze.end + timedelta(days=1), time(0), zone)
    if starts <= local < ends:
        return Freeze(reason=freeze.reason, starts=starts, ends=ends)
    return None


def _weekly(freeze: WeeklyFreeze, local: datetime) -> Freeze | None:
    """The occurrence of `freeze` holding at `local`: one starting today or yesterday."""
    zone = local.tzinfo
    for back in (0, 1):
        day = local.date() - timedelta(days=back)
        if WEEKDAYS[day.weekday()] not in freeze.days:
            continue
        starts = datetime.combine(day, freeze.start, zone)
        end_day = day + timedelta(days=1) if freeze.end <= freeze.start else day
        ends = datetime.combine(end_day, freeze.end, zone)
        if starts <= local < ends:
            return Freeze(reason=freeze.reason, starts=starts, ends=ends)
    return None


def frozen_at(windows: DeployWindows | None, now: datetime) -> Freeze | None:
    """The freeze holding at `now` (timezone-aware), the dated ones first; None: open.

    Raises:
        ValueError: `now` is naive (an instant without a zone is no instant).
    """
    if now.tzinfo is None or now.utcoffset() is None:
        msg = "the instant to judge a deploy window at must be timezone-aware"
        raise ValueError(msg)
    if windows is None:
        return None
    local = now.astimezone(zone_of(windows.time_zone))
    for freeze in windows.freezes:
        if found := _dated(freeze, local):
            return found
    for weekly in windows.weekly:
        if found := _weekly(weekly, local):
            return found
    return None


def parse_clock(text: str) -> datetime:
    """The instant an ELICE_CLOCK value names (ISO 8601 with its offset, e.g.
    2026-12-24T10:00:00+09:00).

    Raises:
        ValueError: not ISO 8601, or without an offset.
    """
    try:
        instant = datetime.fromisoformat(text.strip())
    except ValueError:
        msg = f"ELICE_CLOCK {text!r} is not an ISO 8601 time (e.g. 2026-12-24T10:00:00+09:00)"
        raise ValueError(msg) from None
    if instant.tzinfo is None or instant.utcoffset() is None:
        msg = f"ELICE_CLOCK {text!r} has no UTC offset; add one (e.g. +00:00)"
        raise ValueError(msg)
    return instant


def clock_now(setting: str = "") -> datetime:
    """The instant deploy windows are judged at: `setting` (ELICE_CLOCK) when given, else
    the system clock, in UTC."""
    return parse_clock(setting).astimezone(UTC) if setting.strip() else datetime.now(UTC)

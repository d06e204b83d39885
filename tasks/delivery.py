"""Delivery metrics of the pipeline (DORA), read from the release ledger; CI stage metrics.

Per environment, over a window ending now:

- deployment frequency: releases that went live (a promotion, or a CI deploy into an
  environment CI deploys directly) per day; rollbacks are not deployments;
- lead time: from the commit's time (git) to the release serving in the environment;
- change failure rate: failed changes over all changes, where a change is a deployment or
  a promotion that failed while deploying, and a failed change is a promotion the pipeline
  rolled back, one whose run died deploying (undone by the next run), or a deployment
  later rolled back by hand (`cicd rollback`);
- time to restore: from a failed change going out (its deploys starting, or the bad
  release going live) to the previous release serving again.

The ledger's revisions say what happened: `change` names a promotion ("release R promoted
from S"), its rollback ("release R rolled back: ...") or a dead run undone ("run X died
deploying release R; ..."); a revision that only changes `services` is a CI deploy, or a
rollback by hand when a service's record becomes the one it had before. Pure functions
(`delivery_events`, `delivery_metrics`, `prometheus_text`) work on ledger revisions and are
tested without Prefect.

This module imports no Prefect: `cicd metrics` reads the ledger's directory with it
(`tasks.local_store`); the flows publish the same metrics through `tasks.metrics`.
"""

from __future__ import annotations

import re
import statistics
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from core.errors import ToolError
from core.ledger import EnvironmentState, ReleaseRecord, check_environment_name
from core.records import StageResult, utcnow
from core.settings import Settings
from core.tools import which
from tasks.local_store import LedgerReader

DEFAULT_WINDOW_DAYS = 30.0
_PROMOTED = re.compile(r"^release (?P<release>\S+) promoted from \S+")
_ROLLED_BACK = re.compile(r"^release (?P<release>\S+) rolled back: ")
_DIED = re.compile(r"^run \S+ died deploying release (?P<release>\S+);")
_SHA = re.compile(r"^[0-9a-f]{7,64}$")

CommitTimes = Callable[[str], datetime | None]
"""The commit time of a SHA, None when unknown."""


EventKind = Literal["deployment", "failed-promotion", "rollback"]
EventSource = Literal["promotion", "ci", "by-hand", "recovery", "pipeline"]


class DeliveryEvent(BaseModel):
    """Something that changed what an environment serves."""

    model_config = ConfigDict(frozen=True)

    environment: str
    kind: EventKind
    release_id: str
    at: datetime = Field(description="When the revision recording it was written")
    revision: int
    records: tuple[ReleaseRecord, ...] = Field(
        default=(), description="A deployment's records that went live"
    )
    started_at: datetime | None = Field(
        default=None, description="A failed promotion's deploys began (its intent)"
    )
    source: EventSource = "pipeline"


class DeliveryMetrics(BaseModel):
    """The four DORA metrics of one environment over a window."""

    model_config = ConfigDict(frozen=True)

    environment: str
    since: datetime
    until: datetime
    window_days: float
    deployments: int = Field(description="Releases that went live in the window")
    deployment_frequency_per_day: float
    changes: int = Field(description="Deployments plus promotions that failed while deploying")
    failed_changes: int
    change_failure_rate: float | None = Field(description="None: no change in the window")
    lead_time_median_s: float | None = Field(description="Commit to serving, median")
    lead_time_samples: int = Field(description="Records whose commit time was known")
    time_to_restore_median_s: float | None
    restores: int
    last_deployment_at: datetime | None


# --- events from the ledger -----------------------------------------------------------


def _same(a: ReleaseRecord | None, b: ReleaseRecord | None) -> bool:
    if a is None or b is None:
        return a is b
    return (a.release_id, a.image.digest, a.deployed_at) == (
        b.release_id,
        b.image.digest,
        b.deployed_at,
    )


def _changed(state: EnvironmentState, before: EnvironmentState | None) -> list[str]:
    """The services whose record differs between `before` and `state`."""
    names = sorted(set(state.services) | set(before.services if before else {}))
    return [
        name
        for name in names
        if not _same(state.services.get(name), before.services.get(name) if before else None)
    ]


def _event(
    state: EnvironmentState,
    kind: EventKind,
    release_id: str,
    source: EventSource,
    *,
    records: tuple[ReleaseRecord, ...] = (),
    started_at: datetime | None = None,
) -> DeliveryEvent:
    """An event of `state`'s revision: its environment, its number, when it was written."""
    return DeliveryEvent(
        environment=state.environment,
        kind=kind,
        release_id=release_id,
        at=state.updated_at,
        revision=state.revision,
        records=records,
        started_at=started_at,
        source=source,
    )


def _by_hand_events(
    state: EnvironmentState, before: EnvironmentState | None, changed: list[str]
) -> list[DeliveryEvent]:
    """Records changed outside a promotion: restores by hand, else CI's deployments."""
    # Restored by hand: the record is the one the service had before (or none).
    restored = [
        n
        for n in changed
        if before is not None
        and (n not in state.services or _same(state.services[n], before.previous.get(n)))
    ]
    events = []
    for name in restored:
        bad = before.services.get(name) if before is not None else None
        release = bad.release_id if bad else ""
        events.append(_event(state, "rollback", release, "by-hand", records=(bad,) if bad else ()))
    events.extend(
        _event(
            state, "deployment", state.services[n].release_id, "ci", records=(state.services[n],)
        )
        for n in changed
        if n not in restored and n in state.services
    )
    return events


def _revision_events(
    state: EnvironmentState, before: EnvironmentState | None
) -> list[DeliveryEvent]:
    """What one revision did: a promotion, a failed promotion, or changes by hand or CI."""
    text_changed = before is None or state.change != before.change
    changed = _changed(state, before)
    promoted = _PROMOTED.match(state.change) if text_changed else None
    failed = (
        (_ROLLED_BACK.match(state.change) or _DIED.match(state.change)) if text_changed else None
    )
    if promoted:
        release = promoted.group("release")
        records = tuple(
            state.services[n]
            for n in changed
            if n in state.services and state.services[n].release_id == release
        )
        return [_event(state, "deployment", release, "promotion", records=records)]
    if failed:
        release = failed.group("release")
        intent = before.in_progress if before is not None else None
        started = intent.started_at if intent and intent.release_id == release else None
        source: EventSource = "recovery" if failed.re is _DIED else "pipeline"
        return [_event(state, "failed-promotion", release, source, started_at=started)]
    return _by_hand_events(state, before, changed) if changed else []


def delivery_events(history: Sequence[EnvironmentState]) -> list[DeliveryEvent]:
    """What each revision of one environment's ledger did, oldest first."""
    events: list[DeliveryEvent] = []
    before: EnvironmentState | None = None
    for state in history:
        events.extend(_revision_events(state, before))
        before = state
    return events


# --- the metrics ----------------------------------------------------------------------


def git_commit_times(repo: Path | None = None) -> CommitTimes:
    """Commit times read from git in `repo` (default: the repository), cached per SHA."""
    where = repo or Settings.from_environ().repo
    seen: dict[str, datetime | None] = {}

    def commit_time(sha: str) -> datetime | None:
        if not _SHA.match(sha):
            return None
        if sha not in seen:
            show = ["show", "-s", "--format=%cI", f"{sha}^{{commit}}"]
            try:
                done = subprocess.run(
                    [which("git"), "-C", str(where), *show],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                msg = f"git show {sha} timed out after 30s in {where}"
                raise ToolError(msg) from None
            text = done.stdout.strip().splitlines()
            seen[sha] = datetime.fromisoformat(text[-1]) if done.returncode == 0 and text else None
        return seen[sha]

    return commit_time


def _median(values: Iterable[float]) -> float | None:
    found = list(values)
    return statistics.median(found) if found else None


def _failures(
    deployments: list[DeliveryEvent],
    rollbacks: list[DeliveryEvent],
    failed_promotions: list[DeliveryEvent],
) -> tuple[set[int], list[float]]:
    """The revisions of deployments a rollback failed, and every time to restore (s)."""
    # A rollback by hand fails the deployment that put its release live (the latest before).
    restore_times: list[float] = []
    failed_deployments: set[int] = set()
    for rollback in rollbacks:
        cause = next(
            (
                d
                for d in reversed(deployments)
                if d.at <= rollback.at and d.release_id == rollback.release_id
            ),
            None,
        )
        if cause is not None:
            failed_deployments.add(cause.revision)
            restore_times.append((rollback.at - cause.at).total_seconds())
    restore_times += [
        (e.at - e.started_at).total_seconds() for e in failed_promotions if e.started_at
    ]
    return failed_deployments, restore_times


def _lead_times(deployments: list[DeliveryEvent], commit_times: CommitTimes) -> list[float]:
    """Commit to deploy, in seconds, of every deployed record whose commit time is known."""
    lead_times = []
    for deployment in deployments:
        for record in deployment.records:
            committed = commit_times(record.commit) if record.commit else None
            if committed is not None:
                lead_times.append(max(0.0, (record.deployed_at - committed).total_seconds()))
    return lead_times


def delivery_metrics(
    environment: str,
    history: Sequence[EnvironmentState],
    commit_times: CommitTimes,
    *,
    window_days: float = DEFAULT_WINDOW_DAYS,
    now: datetime | None = None,
) -> DeliveryMetrics:
    """The DORA metrics of `environment` over the `window_days` before `now`.

    Raises:
        ValueError: a window that is not positive.
    """
    if window_days <= 0:
        msg = f"window_days must be positive, got {window_days}"
        raise ValueError(msg)
    until = now or utcnow()
    since = until - timedelta(days=window_days)
    events = delivery_events(history)
    deployments = [e for e in events if e.kind == "deployment"]
    in_window = [e for e in deployments if since <= e.at <= until]
    failed_promotions = [
        e for e in events if e.kind == "failed-promotion" and since <= e.at <= until
    ]
    rollbacks = [e for e in events if e.kind == "rollback" and since <= e.at <= until]

    failed_deployments, restore_times = _failures(deployments, rollbacks, failed_promotions)
    failed = len(failed_promotions) + len(
        [d for d in in_window if d.revision in failed_deployments]
    )
    changes = len(in_window) + len(failed_promotions)
    lead_times = _lead_times(in_window, commit_times)

    return DeliveryMetrics(
        environment=environment,
        since=since,
        until=until,
        window_days=window_days,
        deployments=len(in_window),
        deployment_frequency_per_day=len(in_window) / window_days,
        changes=changes,
        failed_changes=failed,
        change_failure_rate=failed / changes if changes else None,
        lead_time_median_s=_median(lead_times),
        lead_time_samples=len(lead_times),
        time_to_restore_median_s=_median(restore_times),
        restores=len(restore_times),
        last_deployment_at=max((d.at for d in deployments), default=None),
    )


# --- CI stages ------------------------------------------------------------------------


class StageMetrics(BaseModel):
    """One service's stage over several CI runs."""

    model_config = ConfigDict(frozen=True)

    service: str
    stage: str
    runs: int = Field(description="Runs of the stage that passed, failed or were cached")
    mean_seconds: float | None = Field(description="Mean duration of the runs that ran")
    cached: int


def stage_metrics(results: Iterable[StageResult]) -> list[StageMetrics]:
    """Per service and stage: how often it ran, its mean duration, how often it was cached."""
    grouped: dict[tuple[str, str], list[StageResult]] = {}
    for result in results:
        if result.status in ("passed", "failed", "cached"):
            grouped.setdefault((result.service, result.stage), []).append(result)
    found = []
    for (service, stage), runs in sorted(grouped.items()):
        ran = [r.seconds for r in runs if r.status != "cached" and r.seconds > 0]
        found.append(
            StageMetrics(
                service=service,
                stage=stage,
                runs=len(runs),
                mean_seconds=statistics.fmean(ran) if ran else None,
                cached=sum(r.status == "cached" for r in runs),
            )
        )
    return found


def cache_hit_ratio(stages: Iterable[StageMetrics]) -> dict[str, float]:
    """Per service: cached stage runs over all its stage runs."""
    totals: dict[str, list[int]] = {}
    for s in stages:
        total = totals.setdefault(s.service, [0, 0])
        total[0] += s.cached
        total[1] += s.runs
    return {service: cached / runs for service, (cached, runs) in totals.items() if runs}


# --- output ---------------------------------------------------------------------------

GAUGES: Mapping[str, str] = {
    "elice_delivery_deployments": "Releases that went live in the window",
    "elice_delivery_deployment_frequency_per_day": "Releases that went live per day",
    "elice_delivery_lead_time_seconds": "Median time from commit to serving",
    "elice_delivery_change_failure_ratio": "Failed changes over all changes",
    "elice_delivery_time_to_restore_seconds": "Median time from a failed change to restored",
    "elice_delivery_window_seconds": "The window the delivery metrics cover",
    "elice_delivery_last_deployment_timestamp_seconds": "When the latest release went live",
    "elice_ci_stage_duration_seconds": "Mean duration of a CI stage of a service",
    "elice_ci_cache_hit_ratio": "Cached CI stage runs over all stage runs of a service",
}
"""Every series `prometheus_text` writes, with its help text."""


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(metrics: Iterable[DeliveryMetrics], stages: Iterable[StageMetrics] = ()) -> str:
    """The metrics in Prometheus' text exposition format, one gauge family per metric.

    Unknown values (no change in the window, no commit time) are left out, not written as 0.
    """
    samples: dict[str, list[str]] = {name: [] for name in GAUGES}

    def add(name: str, labels: Mapping[str, str], value: float | None) -> None:
        if value is None:
            return
        text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        samples[name].append(f"{name}{{{text}}} {float(value)!r}")

    for m in metrics:
        env = {"environment": m.environment}
        add("elice_delivery_deployments", env, m.deployments)
        add("elice_delivery_deployment_frequency_per_day", env, m.deployment_frequency_per_day)
        add("elice_delivery_lead_time_seconds", env, m.lead_time_median_s)
        add("elice_delivery_change_failure_ratio", env, m.change_failure_rate)
        add("elice_delivery_time_to_restore_seconds", env, m.time_to_restore_median_s)
        add("elice_delivery_window_seconds", env, m.window_days * 86400)
        last = m.last_deployment_at.timestamp() if m.last_deployment_at else None
        add("elice_delivery_last_deployment_timestamp_seconds", env, last)
    stage_list = list(stages)
    for s in stage_list:
        add(
            "elice_ci_stage_duration_seconds",
            {"service": s.service, "stage": s.stage},
            s.mean_seconds,
        )
    for service, ratio in sorted(cache_hit_ratio(stage_list).items()):
        add("elice_ci_cache_hit_ratio", {"service": service}, ratio)
    lines = []
    for name, help_text in GAUGES.items():
        if samples[name]:
            lines += [f"# HELP {name} {help_text}.", f"# TYPE {name} gauge", *samples[name]]
    return "\n".join(lines) + "\n" if lines else ""


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def metrics_row(m: DeliveryMetrics) -> dict[str, str]:
    """One environment's metrics as display cells."""
    rate = m.change_failure_rate
    return {
        "environment": m.environment,
        "deployments": str(m.deployments),
        "per day": f"{m.deployment_frequency_per_day:.2f}",
        "lead time (median)": _duration(m.lead_time_median_s)
        + (f" ({m.lead_time_samples})" if m.lead_time_samples else ""),
        "change failure rate": "-"
        if rate is None
        else f"{rate:.0%} ({m.failed_changes}/{m.changes})",
        "time to restore (median)": _duration(m.time_to_restore_median_s),
        "last deployment": f"{m.last_deployment_at:%Y-%m-%d %H:%M %Z}"
        if m.last_deployment_at
        else "-",
    }


def metrics_markdown(metrics: Sequence[DeliveryMetrics]) -> str:
    """The metrics as a Markdown table with the window they cover."""
    if not metrics:
        return "# Delivery metrics\n\n_No environment._\n"
    first = metrics[0]
    rows = [metrics_row(m) for m in metrics]
    columns = list(rows[0])
    lines = [
        "# Delivery metrics",
        "",
        (
            f"The {first.window_days:g} days to {first.until:%Y-%m-%d %H:%M %Z}, "
            "from the release ledger."
        ),
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(row[c] for c in columns) + " |" for row in rows),
    ]
    return "\n".join(lines) + "\n"


def environment_metrics(
    environments: Iterable[str],
    *,
    window_days: float = DEFAULT_WINDOW_DAYS,
    ledger: LedgerReader,
    commit_times: CommitTimes | None = None,
    now: datetime | None = None,
) -> list[DeliveryMetrics]:
    """The metrics of each environment from `ledger`."""
    book = ledger
    times = commit_times or git_commit_times()
    until = now or datetime.now(UTC)
    return [
        delivery_metrics(
            check_environment_name(env),
            book.history(env),
            times,
            window_days=window_days,
            now=until,
        )
        for env in environments
    ]

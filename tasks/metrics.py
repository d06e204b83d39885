"""Delivery metrics published by the flows: the plain metrics (`tasks.delivery`) as an
artifact of the run that changed the ledger.

The metrics themselves live in `tasks.delivery`, which imports no Prefect, so `cicd
metrics` reads them without it; this module re-exports them for the flows and their tests.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.filesystems import WritableFileSystem

from tasks.delivery import (
    DEFAULT_WINDOW_DAYS,
    GAUGES,
    CommitTimes,
    DeliveryEvent,
    DeliveryMetrics,
    StageMetrics,
    cache_hit_ratio,
    delivery_events,
    delivery_metrics,
    environment_metrics,
    git_commit_times,
    metrics_markdown,
    metrics_row,
    prometheus_text,
    stage_metrics,
)
from tasks.process import run_logger
from tasks.releases import Ledger

__all__ = [
    "DEFAULT_WINDOW_DAYS",
    "GAUGES",
    "CommitTimes",
    "DeliveryEvent",
    "DeliveryMetrics",
    "StageMetrics",
    "cache_hit_ratio",
    "delivery_events",
    "delivery_metrics",
    "environment_metrics",
    "git_commit_times",
    "metrics_markdown",
    "metrics_row",
    "prometheus_text",
    "publish_delivery_metrics",
    "stage_metrics",
]


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def publish_delivery_metrics(
    store: WritableFileSystem,
    environment: str,
    repo: Path,
    window_days: float = DEFAULT_WINDOW_DAYS,
) -> DeliveryMetrics:
    """Compute an environment's delivery metrics (the ledger in `store`, commit times from
    `repo`) and publish them as artifact `delivery-<env>`."""
    (metrics,) = environment_metrics(
        [environment],
        window_days=window_days,
        ledger=Ledger(store),
        commit_times=git_commit_times(repo),
    )
    create_markdown_artifact(
        markdown=metrics_markdown([metrics]),
        key=f"delivery-{environment}",
        description=f"Delivery metrics of {environment} over {window_days:g} days",
    )
    row = metrics_row(metrics)
    run_logger().info(
        "%s: %s deployments, lead time %s, change failure rate %s, time to restore %s",
        environment,
        row["deployments"],
        row["lead time (median)"],
        row["change failure rate"],
        row["time to restore (median)"],
    )
    return metrics

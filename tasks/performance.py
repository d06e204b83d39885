"""The performance baseline: a small bounded load probe, and the regression rule."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import httpx
from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from blocks.catalog import ServiceSpec
from blocks.config import PerformancePolicy
from core.errors import PerformanceRegression
from core.records import utcnow
from tasks.health import VERSION_PATH, check_address
from tasks.process import run_logger

REQUEST_TIMEOUT_S = 10.0


class Baseline(BaseModel):
    """Latency and errors of one probe of one service."""

    model_config = ConfigDict(frozen=True)

    service: str
    url: str = Field(default="", description="The URL that was probed")
    requests: int
    errors: int = 0
    p50_ms: float
    p95_ms: float
    error_rate: float = Field(ge=0, le=1)
    measured_at: datetime = Field(default_factory=utcnow)
    analysis: str | None = Field(
        default=None, description="The post-deploy analysis' verdict and what it rested on"
    )
    analysis_values: dict[str, float] = Field(
        default_factory=dict, description="Check name -> its median measured value"
    )


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def _timed_get(client: httpx.Client, path: str) -> tuple[float, bool]:
    started = time.perf_counter()
    try:
        ok = client.get(path).status_code < 400
    except httpx.HTTPError:
        ok = False
    return (time.perf_counter() - started) * 1000, ok


def probe_baseline(
    address: str,
    path: str,
    policy: PerformancePolicy,
    *,
    service: str = "",
    timeout_s: float = REQUEST_TIMEOUT_S,
) -> Baseline:
    """Send `policy.requests` GETs to `path`, `policy.concurrency` at a time; measure them.

    A failed or timed-out request counts as an error and its time as latency.

    Raises:
        ValueError: a bad address or path (before any request).
    """
    base = check_address(address)
    if not path.startswith("/"):
        msg = f"path must start with '/', got {path!r}"
        raise ValueError(msg)
    limits = httpx.Limits(max_connections=policy.concurrency)
    with (
        httpx.Client(base_url=base, timeout=timeout_s, limits=limits) as client,
        ThreadPoolExecutor(max_workers=policy.concurrency) as pool,
    ):
        _timed_get(client, path)  # warm-up: connection set-up is not the service's latency
        results = list(pool.map(lambda _: _timed_get(client, path), range(policy.requests)))
    latencies = [ms for ms, _ in results]
    errors = sum(1 for _, ok in results if not ok)
    return Baseline(
        service=service,
        url=base + path,
        requests=len(results),
        errors=errors,
        p50_ms=round(percentile(latencies, 0.50), 1),
        p95_ms=round(percentile(latencies, 0.95), 1),
        error_rate=errors / len(results),
    )


def p95_limit(before: Baseline, policy: PerformancePolicy) -> float:
    """The highest p95 a new release may have, given the previous baseline."""
    return max(before.p95_ms * policy.max_p95_ratio, before.p95_ms + policy.min_p95_slack_ms)


def regressions(before: Baseline | None, after: Baseline, policy: PerformancePolicy) -> list[str]:
    """What makes `after` a regression against `before` under `policy` (empty: none)."""
    problems = []
    if after.error_rate > policy.max_error_rate:
        problems.append(
            f"error rate {after.error_rate:.1%} ({after.errors} of {after.requests} requests) "
            f"over the {policy.max_error_rate:.1%} allowed"
        )
    if before is not None and after.p95_ms > (limit := p95_limit(before, policy)):
        problems.append(
            f"p95 {after.p95_ms:.1f} ms vs {before.p95_ms:.1f} ms before (limit {limit:.1f} ms)"
        )
    return problems


@task(task_run_name="measure_baseline-{service.name}")
def measure_baseline(address: str, service: ServiceSpec, policy: PerformancePolicy) -> Baseline:
    """Measure `service` at `address` on /version (a real request path, unlike the probes)."""
    baseline = probe_baseline(address, VERSION_PATH, policy, service=service.name)
    run_logger().info(
        "%s baseline: p50 %.1f ms, p95 %.1f ms, errors %d/%d",
        service.name,
        baseline.p50_ms,
        baseline.p95_ms,
        baseline.errors,
        baseline.requests,
    )
    return baseline


@task(task_run_name="check_regression-{service.name}")
def check_regression(
    service: ServiceSpec, before: Baseline | None, after: Baseline, policy: PerformancePolicy
) -> None:
    """Compare two baselines of `service`.

    Raises:
        PerformanceRegression: listing each limit `after` exceeds.
    """
    problems = regressions(before, after, policy)
    if problems:
        error = PerformanceRegression(service.name, problems)
        run_logger().error(str(error))
        raise error
    run_logger().info("%s: no performance regression", service.name)


# --- baselines as the ledger keeps them -----------------------------------------------


ANALYSIS_PREFIX = "analysis."
"""A baseline record's keys for the analysis' measured values (`analysis.<check>`)."""


def baseline_record(baseline: Baseline) -> dict[str, float]:
    """A baseline as the ledger keeps it, the analysis' median values included (the next
    release's relative checks compare with them)."""
    return {
        "p50_ms": baseline.p50_ms,
        "p95_ms": baseline.p95_ms,
        "error_rate": baseline.error_rate,
        "requests": float(baseline.requests),
        **{ANALYSIS_PREFIX + name: value for name, value in baseline.analysis_values.items()},
    }


def baseline_from_record(service: str, values: Mapping[str, float] | None) -> Baseline | None:
    """The previous release's baseline from its ledger record's `baseline` (see
    `baseline_record`), None when there is none."""
    if not values or "p95_ms" not in values:
        return None
    return Baseline(
        service=service,
        requests=int(values.get("requests", 0)),
        p50_ms=values.get("p50_ms", values["p95_ms"]),
        p95_ms=values["p95_ms"],
        error_rate=min(1.0, max(0.0, values.get("error_rate", 0.0))),
    )

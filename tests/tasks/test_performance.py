"""The baseline probe against the real servicekit app, and the regression rule."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from blocks.catalog import ServiceSpec
from blocks.config import PerformancePolicy
from core.errors import PerformanceRegression, PromotionError
from tasks.performance import (
    Baseline,
    check_regression,
    measure_baseline,
    percentile,
    probe_baseline,
    regressions,
)
from tests.tasks.servicekit_server import free_port, servicekit_server

SERVICE = ServiceSpec(name="probe", port=8100)
POLICY = PerformancePolicy(requests=8, concurrency=4)
# Injected latency far above any plausible noise: the rule allows max(3x, +500 ms).
SLOW_MS = 3000


def baseline(p95: float, error_rate: float = 0.0, requests: int = 40) -> Baseline:
    return Baseline(
        service="probe",
        requests=requests,
        errors=round(error_rate * requests),
        p50_ms=p95 / 2,
        p95_ms=p95,
        error_rate=error_rate,
    )


@pytest.fixture(scope="module")
def fast(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with servicekit_server(tmp_path_factory.mktemp("fast"), {"FAULT_HEALTH": "1"}) as url:
        yield url


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {"FAULT_LATENCY_MS": str(SLOW_MS)}
    with servicekit_server(tmp_path_factory.mktemp("slow"), env) as url:
        yield url


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 21)]
    assert percentile(values, 0.5) == 10.0
    assert percentile(values, 0.95) == 19.0
    assert percentile([7.0], 0.95) == 7.0
    assert percentile([], 0.95) == 0.0


def test_first_release_has_nothing_to_regress_from() -> None:
    assert regressions(None, baseline(5000.0), PerformancePolicy()) == []


def test_small_absolute_growth_is_noise() -> None:
    # 10 ms -> 400 ms is 40x, but within the 500 ms slack.
    assert regressions(baseline(10.0), baseline(400.0), PerformancePolicy()) == []


def test_growth_within_the_ratio_passes_for_slow_services() -> None:
    assert regressions(baseline(1000.0), baseline(2900.0), PerformancePolicy()) == []


def test_p95_over_both_limits_is_reported_with_the_limit() -> None:
    assert regressions(baseline(9.1), baseline(1530.2), PerformancePolicy()) == [
        "p95 1530.2 ms vs 9.1 ms before (limit 509.1 ms)"
    ]
    assert regressions(baseline(1000.0), baseline(3100.0), PerformancePolicy()) == [
        "p95 3100.0 ms vs 1000.0 ms before (limit 3000.0 ms)"
    ]


def test_error_rate_over_the_policy_is_reported_even_without_before() -> None:
    problems = regressions(None, baseline(5.0, error_rate=0.05), PerformancePolicy())
    assert problems == ["error rate 5.0% (2 of 40 requests) over the 1.0% allowed"]


def test_both_problems_are_reported() -> None:
    problems = regressions(baseline(5.0), baseline(900.0, error_rate=0.5), PerformancePolicy())
    assert len(problems) == 2
    assert problems[0].startswith("error rate 50.0%")
    assert problems[1].startswith("p95 900.0 ms")


def test_injected_latency_is_a_regression(fast: str, slow: str) -> None:
    before = measure_baseline.fn(fast, SERVICE, POLICY)
    after = measure_baseline.fn(slow, SERVICE, POLICY)
    assert (before.requests, before.errors, after.requests, after.errors) == (8, 0, 8, 0)
    assert before.url == f"{fast}/version"
    assert after.p95_ms >= SLOW_MS
    assert after.p50_ms >= SLOW_MS
    with pytest.raises(PerformanceRegression) as caught:
        check_regression(SERVICE, before, after, POLICY)
    assert isinstance(caught.value, PromotionError)
    assert caught.value.service == "probe"
    assert caught.value.problems[0].startswith(f"p95 {after.p95_ms:.1f} ms vs {before.p95_ms:.1f}")
    check_regression.fn(SERVICE, before, before, POLICY)


def test_failing_endpoint_counts_every_request_as_an_error(fast: str) -> None:
    # FAULT_HEALTH makes /ready answer 503.
    result = probe_baseline(fast, "/ready", POLICY, service="probe")
    assert (result.requests, result.errors, result.error_rate) == (8, 8, 1.0)
    assert regressions(None, result, POLICY)[0].startswith("error rate 100.0% (8 of 8 requests)")


def test_timeouts_and_refused_connections_are_errors(slow: str) -> None:
    timed_out = probe_baseline(slow, "/version", POLICY, timeout_s=0.5)
    assert timed_out.errors == 8
    refused = probe_baseline(f"http://127.0.0.1:{free_port()}", "/version", POLICY)
    assert refused.error_rate == 1.0


def test_bad_path_is_refused_before_any_request() -> None:
    with pytest.raises(ValueError, match="must start with '/'"):
        probe_baseline("http://127.0.0.1:1", "version", POLICY)

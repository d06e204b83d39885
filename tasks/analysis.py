"""The post-deploy analysis: the environment's PromQL checks measured against its Prometheus
while the load probe drives traffic to the new release, then a verdict.

The checks are the environment's `analysis` in the approval policy on the protected branch
(`core/analysis.py`); the Prometheus is the one the environment's configuration names
(`prometheus_url`), else the local stack's (`stack.json`). A verdict rests on what
Prometheus answered, nothing else: no Prometheus, no answer, no series, more than one
series, an error are "no data", and a check without enough good measurements is
inconclusive, which fails the release like a failed check.

    analysis_of(policy, env)                        the run's analysis, None when it has none
    measure(url, query)                             one PromQL value, or why there is none
    analyse_release(run, addresses, services, ...)  the checks under load; the verdict per
                                                    service, AnalysisFailed otherwise
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import ValidationError

from blocks.approvals import ApprovalPolicy
from blocks.config import PerformancePolicy
from blocks.environments import EnvironmentSpec
from blocks.stack import load_stack_info
from core.analysis import AnalysisPolicy, CheckResult, decided, limit_of, overall
from core.errors import AnalysisFailed, AnalysisInconclusive
from tasks.health import VERSION_PATH
from tasks.performance import ANALYSIS_PREFIX, probe_baseline
from tasks.process import run_logger

QUERY_TIMEOUT_S = 5.0
NO_PROMETHEUS = "no Prometheus: the environment names none and the local stack records none"


@dataclass(frozen=True)
class AnalysisRun:
    """What one promotion's analysis needs: the environment, its policy, its Prometheus."""

    environment: str
    policy: AnalysisPolicy
    prometheus_url: str | None
    label: str | None = None
    """The scrape `environment` label `$environment` stands for (None: the environment's
    name); a blue-green promotion's green step judges `<env>-green`, green alone."""


def analysis_of(
    policy: ApprovalPolicy, env: EnvironmentSpec, stack_root: Path | None = None
) -> AnalysisRun | None:
    """The analysis of `env` under `policy` (None: the policy names none), against the
    Prometheus `env` names, else the one the local stack records (under `stack_root`)."""
    analysis = policy.analysis.get(env.name)
    if analysis is None:
        return None
    url = env.prometheus_url
    if url is None:
        try:
            info = load_stack_info(stack_root)
        except (OSError, ValidationError):
            info = None  # no readable stack record: no Prometheus, hence inconclusive
        url = info.prometheus_url if info is not None else None
    return AnalysisRun(environment=env.name, policy=analysis, prometheus_url=url)


def measure(
    url: str | None, query: str, timeout_s: float = QUERY_TIMEOUT_S
) -> tuple[float | None, str]:
    """The value of the instant `query` at `url` now, or (None, why there is none)."""
    if url is None:
        return None, NO_PROMETHEUS
    try:
        answer = httpx.get(
            f"{url.rstrip('/')}/api/v1/query", params={"query": query}, timeout=timeout_s
        )
        body = answer.json()
    except (httpx.HTTPError, ValueError) as exc:
        return None, f"Prometheus at {url} did not answer: {type(exc).__name__}: {exc}"
    if answer.status_code != 200 or body.get("status") != "success":
        return None, f"Prometheus at {url} answered {answer.status_code}: {body.get('error')}"
    data = body.get("data", {})
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar":
        return _number(result[1])
    if kind != "vector":
        return None, f"a {kind} result: a check's query must give one series or a scalar"
    if not result:
        return None, "no data: the query matched no series"
    if len(result) > 1:
        return None, f"{len(result)} series: a check's query must give one"
    return _number(result[0]["value"][1])


def _number(text: str) -> tuple[float | None, str]:
    """A sample's value; NaN (a ratio or quantile of no traffic) is no data, not a value."""
    value = float(text)
    if math.isnan(value):
        return None, "no data: NaN (nothing observed in the query's window)"
    return value, ""


@contextmanager
def load_on(addresses: list[str], policy: PerformancePolicy) -> Iterator[None]:
    """The load probe (`tasks/performance.py`) sent to every address, round after round,
    until the block ends: the analysis judges the release under traffic."""
    stop = threading.Event()

    def drive(address: str) -> None:
        while not stop.is_set():
            try:
                probe_baseline(address, VERSION_PATH, policy)
            except ValueError:
                return  # a bad address: nothing to load
            stop.wait(0.05)

    threads = [threading.Thread(target=drive, args=(a,), daemon=True) for a in addresses]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)


def initial_results(
    run: AnalysisRun,
    services: Mapping[str, str],
    previous: Mapping[str, Mapping[str, float] | None],
) -> list[CheckResult]:
    """One empty result per service and check: the rendered query and its limit.
    `services` maps each service to its new digest; `previous` to its previous record's
    baseline (where relative checks find the previous release's values)."""
    results = []
    for service, digest in services.items():
        recorded = previous.get(service) or {}
        label = run.label or run.environment
        values = {"service": service, "environment": label, "digest": digest}
        results += [
            CheckResult(
                service=service,
                check=check.name,
                query=check.render(values),
                limit=limit_of(check, recorded.get(ANALYSIS_PREFIX + check.name)),
            )
            for check in run.policy.checks
        ]
    return results


def run_checks(
    run: AnalysisRun,
    results: list[CheckResult],
    sleep: Callable[[float], None] = time.sleep,
) -> list[CheckResult]:
    """After the bake time, up to `count` rounds `interval_s` apart, each measuring every
    undecided check; stops early once the verdict can no longer change."""
    policy = run.policy
    sleep(policy.bake_s)
    for index in range(policy.count):
        if index:
            sleep(policy.interval_s)
        results = [
            r
            if r.verdict(policy) is not None
            else r.with_value(*measure(run.prometheus_url, r.query))
            for r in results
        ]
        if decided(results, policy):
            break
    return results


def _median(result: CheckResult) -> float | None:
    values = [v for v in result.values if v is not None]
    return statistics.median(values) if values else None


def publish_analysis(run: AnalysisRun, release_id: str, results: list[CheckResult]) -> None:
    """The table artifact of the run: each check's query, measurements and verdict."""
    rows = [
        {
            "service": r.service,
            "check": r.check,
            "query": r.query,
            "limit": r.limit.describe(),
            "measurements": r.shown_values(),
            "verdict": r.verdict(run.policy) or "inconclusive",
            "note": r.problems[-1] if r.problems else "",
        }
        for r in results
    ]
    verdict = overall(results, run.policy)
    create_table_artifact(
        key=f"analysis-{run.environment}",
        table=rows,
        description=(
            f"Analysis of release {release_id} in {run.environment}: **{verdict}** "
            f"(Prometheus {run.prometheus_url or 'none'})"
        ),
    )


def service_verdicts(
    run: AnalysisRun, results: list[CheckResult]
) -> dict[str, tuple[str, dict[str, float]]]:
    """Per service: the verdict line the ledger keeps and each check's median value."""
    out: dict[str, tuple[str, dict[str, float]]] = {}
    for service in dict.fromkeys(r.service for r in results):
        own = [r for r in results if r.service == service]
        medians = {r.check: m for r in own if (m := _median(r)) is not None}
        checks = "; ".join(f"{r.check} {r.shown_values()} ({r.limit.describe()})" for r in own)
        out[service] = (f"{overall(own, run.policy)} at {run.prometheus_url}: {checks}", medians)
    return out


@task(cache_policy=NO_CACHE)
def analyse_release(
    run: AnalysisRun,
    addresses: Mapping[str, str],
    services: Mapping[str, str],
    previous: Mapping[str, Mapping[str, float] | None],
    release: tuple[str, PerformancePolicy],
) -> dict[str, tuple[str, dict[str, float]]]:
    """The environment's checks over the release's services (service -> new digest) while
    the load probe drives each address; `release` is (its id, the load probe's policy).

    Returns service -> (the verdict line for its ledger record, each check's median).

    Raises:
        AnalysisFailed: a check failed; names its query, measured values and limit.
        AnalysisInconclusive: a check could not be judged (no data, no Prometheus).
    """
    release_id, load = release
    with load_on([addresses[s] for s in services], load):
        results = run_checks(run, initial_results(run, services, previous))
    publish_analysis(run, release_id, results)
    return passed_verdicts(run, results)


def passed_verdicts(
    run: AnalysisRun, results: list[CheckResult]
) -> dict[str, tuple[str, dict[str, float]]]:
    """`service_verdicts` of an analysis that passed; raises for any other verdict.

    Raises:
        AnalysisFailed: a check failed; names its query, measured values and limit.
        AnalysisInconclusive: a check could not be judged (no data, no Prometheus).
    """
    verdict = overall(results, run.policy)
    judged = [r for r in results if (r.verdict(run.policy) or "inconclusive") == verdict]
    lines = "; ".join(r.summary(run.policy) for r in judged)
    if verdict == "failed":
        raise AnalysisFailed(f"analysis failed in {run.environment}: {lines}")
    if verdict == "inconclusive":
        msg = f"analysis inconclusive in {run.environment} (never a pass): {lines}"
        raise AnalysisInconclusive(msg)
    run_logger().info("analysis passed in %s: %d checks", run.environment, len(results))
    return service_verdicts(run, results)

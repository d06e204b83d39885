"""Health checks: liveness, readiness and the running build's digest, over HTTP."""

from __future__ import annotations

import time

import httpx
from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from blocks.catalog import ServiceSpec
from core.errors import HealthCheckFailed, PromotionRefused
from core.records import DeployOutcome, HealthReport, HealthResult, ImageRef
from tasks.process import run_logger

VERSION_PATH = "/version"
REQUEST_TIMEOUT_S = 5.0


def check_address(address: str) -> str:
    """`address` without a trailing slash.

    Raises:
        ValueError: not an http(s) URL.
    """
    if not address.startswith(("http://", "https://")):
        msg = f"address must be an http:// or https:// URL, got {address!r}"
        raise ValueError(msg)
    return address.rstrip("/")


def _get(client: httpx.Client, path: str) -> tuple[httpx.Response | None, str | None]:
    """GET `path`: the response when it is 200, else a failure naming the endpoint."""
    try:
        response = client.get(path)
    except httpx.TransportError as exc:
        return None, f"{path}: connection error ({type(exc).__name__}: {exc})"
    if response.status_code != 200:
        return None, f"{path}: answered {response.status_code}"
    return response, None


def _probe_once(
    client: httpx.Client, service: ServiceSpec, expect_digest: str | None
) -> tuple[list[str], dict[str, str]]:
    failures = [
        f for path in (service.health_path, service.ready_path) if (f := _get(client, path)[1])
    ]
    if expect_digest is None:
        return failures, {}
    response, failure = _get(client, VERSION_PATH)
    if response is None:
        return [*failures, str(failure)], {}
    try:
        body = response.json()
    except ValueError:
        return [*failures, f"{VERSION_PATH}: answered 200 with a body that is not JSON"], {}
    version = {str(k): str(v) for k, v in body.items()} if isinstance(body, dict) else {}
    digest = version.get("digest", "(none)")
    if digest != expect_digest:
        failures.append(f"{VERSION_PATH}: digest {digest}, expected {expect_digest}")
    return failures, version


def probe_health(
    address: str,
    service: ServiceSpec,
    *,
    deadline_s: float,
    expect_digest: str | None = None,
    interval_s: float = 0.5,
) -> HealthResult:
    """GET the health and ready paths (and /version) until all pass or `deadline_s` passes.

    Raises:
        ValueError: a bad address, deadline or interval (before any request).
    """
    base = check_address(address)
    if deadline_s <= 0 or interval_s <= 0:
        msg = f"deadline_s and interval_s must be positive, got {deadline_s} and {interval_s}"
        raise ValueError(msg)
    started = time.monotonic()
    end = started + deadline_s
    attempts = 0
    with httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT_S) as client:
        while True:
            attempts += 1
            failures, version = _probe_once(client, service, expect_digest)
            remaining = end - time.monotonic()
            if not failures or remaining <= 0:
                break
            time.sleep(min(interval_s, remaining))
    return HealthResult(
        service=service.name,
        url=base,
        ok=not failures,
        attempts=attempts,
        seconds=round(time.monotonic() - started, 3),
        failures=failures,
        version=version,
    )


@task(task_run_name="check_service_health-{service.name}")
def check_service_health(
    address: str, service: ServiceSpec, deadline_s: float = 30, expect_digest: str | None = None
) -> HealthResult:
    """Wait until `service` at `address` is live, ready and (optionally) runs `expect_digest`.

    Raises:
        HealthCheckFailed: naming the service, the URL and each endpoint that failed.
    """
    result = probe_health(address, service, deadline_s=deadline_s, expect_digest=expect_digest)
    logger = run_logger()
    if not result.ok:
        msg = (
            f"{service.name} at {result.url} failed its health check after "
            f"{result.attempts} attempts in {result.seconds:.1f}s: {'; '.join(result.failures)}"
        )
        logger.error(msg)
        raise HealthCheckFailed(msg)
    logger.info(
        "%s at %s is healthy (%d attempts, %.1fs)",
        service.name,
        result.url,
        result.attempts,
        result.seconds,
    )
    return result


@task(task_run_name="verify_deployment-{service.name}")
def verify_deployment(
    outcome: DeployOutcome, service: ServiceSpec, deadline_s: float = 30.0
) -> HealthResult:
    """The deployed service answers /health and /ready and reports the deployed digest."""
    deployed = outcome.deployed
    return check_service_health(
        deployed.address, service, deadline_s=deadline_s, expect_digest=deployed.image.digest
    )


@task(task_run_name="smoke_test_release-{service.name}", cache_policy=NO_CACHE)
def smoke_test_release(
    address: str,
    source_env: str,
    service: ServiceSpec,
    image: ImageRef,
    deadline_s: float = 20,
) -> None:
    """The release serves healthily at `address` in the source environment, running this digest.

    Raises:
        PromotionRefused: it does not; nothing has changed in the target.
    """
    result = probe_health(address, service, deadline_s=deadline_s, expect_digest=image.digest)
    if not result.ok:
        msg = (
            f"{service.name} {image.short} is not healthy in {source_env} "
            f"({result.url}): {'; '.join(result.failures)}"
        )
        raise PromotionRefused(msg)
    run_logger().info("%s %s is healthy in %s", service.name, image.short, source_env)


# --- the health-check flow's report -------------------------------------------------


NOT_DEPLOYED = "nothing deployed: no release recorded in the ledger"


@task(task_run_name="probe_service_health-{service.name}", cache_policy=NO_CACHE)
def probe_service_health(
    address: str, service: ServiceSpec, deadline_s: float, expect_digest: str
) -> HealthResult:
    """Probe one service until healthy or `deadline_s`; the result says which, with the
    attempts, the seconds and each failing endpoint (an unhealthy answer does not raise:
    the flow decides, and reports every service)."""
    result = probe_health(address, service, deadline_s=deadline_s, expect_digest=expect_digest)
    if result.ok:
        run_logger().info("%s: %s", service.name, result.summary_line())
    else:
        run_logger().error("%s: %s", service.name, result.summary_line())
    return result


@task(cache_policy=NO_CACHE)
def publish_health_report(report: HealthReport) -> None:
    """The report as a table artifact `health-<env>` in the Prefect UI."""
    env_name = report.environment
    results = report.results
    create_table_artifact(
        key=f"health-{env_name}",
        table=[
            {
                "service": r.service,
                "ok": r.ok,
                "url": r.url,
                "attempts": r.attempts,
                "seconds": r.seconds,
                "failures": "; ".join(r.failures),
            }
            for r in results
        ],
        description=f"Health of {env_name}",
    )

"""Health checks as tasks: liveness, readiness and the running build's digest, over HTTP
(the probes themselves are `tasks.probes`, which imports no Prefect)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from blocks.catalog import ServiceSpec
from core.errors import HealthCheckFailed, PromotionRefused
from core.records import DeployOutcome, HealthReport, HealthResult, ImageRef
from tasks.probes import NOT_DEPLOYED, REQUEST_TIMEOUT_S, VERSION_PATH, check_address, probe_health
from tasks.process import run_logger

__all__ = [
    "NOT_DEPLOYED",
    "REQUEST_TIMEOUT_S",
    "VERSION_PATH",
    "check_address",
    "check_service_health",
    "probe_health",
    "probe_service_health",
    "publish_health_report",
    "smoke_test_release",
    "verify_deployment",
]


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

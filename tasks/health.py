"""Health checks: liveness, readiness and the running build's digest, over HTTP."""

from __future__ import annotations

import time

import httpx
from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from blocks.catalog import ServiceSpec
from tasks.exceptions import HealthCheckFailed
from tasks.process import run_logger

VERSION_PATH = "/version"
REQUEST_TIMEOUT_S = 5.0


class HealthResult(BaseModel):
    """What a health probe saw; `failures` is empty when `ok`."""

    model_config = ConfigDict(frozen=True)

    service: str
    url: str = Field(description="Base URL that was probed")
    ok: bool
    attempts: int
    seconds: float
    failures: list[str] = Field(default_factory=list, description="endpoint: what it answered")
    version: dict[str, str] = Field(default_factory=dict, description="GET /version, if read")

    def summary_line(self) -> str:
        """One line for the CI report."""
        if self.ok:
            return f"healthy at {self.url} after {self.seconds:.1f}s"
        return f"unhealthy at {self.url}: {'; '.join(self.failures)}"

    def report_details(self) -> dict[str, str]:
        """Columns for the CI report."""
        return {"address": self.url}


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


@task(name="check-service-health")
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

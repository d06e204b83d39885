"""Health probes over HTTP and the health check's verdict, without Prefect.

`probe_health` asks a service's liveness, readiness and running build's digest until they
pass or a deadline; `checked_services`, `probe_all` and `health_verdict` are the
health-check flow's decisions (what to check, the report, when it fails), shared with
`cicd health`, which checks an environment without a flow run: it writes nothing (no run,
no artifact, no notice).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx

from core.catalog import ServiceSpec
from core.errors import EnvironmentUnhealthy
from core.ledger import EnvironmentState
from core.records import HealthReport, HealthResult

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


# --- the health check of an environment ----------------------------------------------

NOT_DEPLOYED = "nothing deployed: no release recorded in the ledger"

Address = Callable[[ServiceSpec], str]
"""A service's address in the environment checked."""


def checked_services(
    environment: str,
    specs: Sequence[ServiceSpec],
    ledger: EnvironmentState,
    named: Sequence[str] | None,
) -> list[ServiceSpec]:
    """The services of `specs` the ledger records (`named`: those the user named).

    Raises:
        EnvironmentUnhealthy: none is recorded ("nothing deployed"), with an empty report.
    """
    checked = [s for s in specs if s.name in ledger.services]
    if not checked:
        which = f" of {', '.join(named)}" if named else ""
        msg = f"{environment}: nothing deployed: the ledger records no release{which}"
        raise EnvironmentUnhealthy(msg, HealthReport(environment=environment, results=[]))
    return checked


def probe_all(
    address: Address,
    checked: Sequence[ServiceSpec],
    deadline_s: float,
    ledger: EnvironmentState,
) -> dict[str, HealthResult]:
    """Each checked service probed at once (a thread each) on the digest the ledger
    records; a probe that could not run counts as unhealthy, naming why."""

    def one(spec: ServiceSpec) -> HealthResult:
        digest = ledger.services[spec.name].image.digest
        try:
            return probe_health(address(spec), spec, deadline_s=deadline_s, expect_digest=digest)
        except ValueError as exc:
            failures = [f"{type(exc).__name__}: {exc}"]
            return HealthResult(
                service=spec.name,
                url=address(spec),
                ok=False,
                attempts=0,
                seconds=0.0,
                failures=failures,
            )

    with ThreadPoolExecutor(max_workers=max(1, len(checked))) as pool:
        return dict(zip((s.name for s in checked), pool.map(one, checked), strict=True))


def health_report(
    environment: str,
    specs: Sequence[ServiceSpec],
    outcomes: dict[str, HealthResult],
    address: Address,
    named: Sequence[str] | None,
) -> HealthReport:
    """The report: each probed service, and each named one the ledger does not record."""
    results = [
        outcomes.get(s.name) or _not_deployed(address(s), s.name)
        for s in specs
        if s.name in outcomes or named
    ]
    return HealthReport(environment=environment, results=results)


def _not_deployed(url: str, service: str) -> HealthResult:
    return HealthResult(
        service=service, url=url, ok=False, attempts=0, seconds=0.0, failures=[NOT_DEPLOYED]
    )


def raise_unhealthy(report: HealthReport, ledger: EnvironmentState) -> None:
    """Raise when a service of `report` is unhealthy, naming which and the promotion that
    may be deploying meanwhile.

    Raises:
        EnvironmentUnhealthy: a service failed, with the report.
    """
    if not report.failed:
        return
    names = ", ".join(f"{r.service} ({'; '.join(r.failures)})" for r in report.failed)
    msg = f"{report.environment}: unhealthy: {names}"
    if ledger.in_progress is not None:
        pending = ledger.in_progress
        msg += (
            f"; run {pending.flow_run_id} has been deploying release {pending.release_id} "
            f"since {pending.started_at:%Y-%m-%d %H:%M:%S %Z} (if it died, the next "
            f"promotion or `cicd rollback {report.environment}` puts the previous releases back)"
        )
    raise EnvironmentUnhealthy(msg, report)

"""The app factory every service uses: ``app = create_app("course", routers=[router])``."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping

from fastapi import APIRouter, FastAPI, Response
from fastapi.responses import JSONResponse

from servicekit.logs import configure_logging
from servicekit.metrics import METRICS_CONTENT_TYPE, Metrics, RequestMiddleware
from servicekit.settings import BuildInfo, Faults

ReadinessCheck = Callable[[], bool | Awaitable[bool]]
_log = logging.getLogger("servicekit")


async def _run_check(check: ReadinessCheck) -> bool:
    try:
        result = check()
        if inspect.isawaitable(result):
            result = await result
    except Exception:
        _log.exception("readiness check %s failed", getattr(check, "__name__", check))
        return False
    return bool(result)


def _probe_router(
    build: BuildInfo, faults: Faults, checks: Mapping[str, ReadinessCheck], metrics: Metrics
) -> APIRouter:
    router = APIRouter(tags=["ops"])
    service = build.service

    @router.get("/health")
    async def health() -> JSONResponse:
        """Liveness: the process answers."""
        if faults.health:
            return JSONResponse({"status": "fault", "service": service}, status_code=503)
        return JSONResponse({"status": "ok", "service": service})

    @router.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: every registered check passes."""
        results = {name: await _run_check(check) for name, check in checks.items()}
        ok = all(results.values()) and not faults.health
        body = {
            "status": "ready" if ok else "not_ready",
            "service": service,
            "checks": results,
        }
        if faults.health:
            body["fault"] = "FAULT_HEALTH"
        return JSONResponse(body, status_code=200 if ok else 503)

    @router.get("/version")
    async def version() -> dict[str, str]:
        """Which build runs here (APP_VERSION, APP_RELEASE, IMAGE_DIGEST, GIT_COMMIT)."""
        return build.as_dict()

    @router.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    return router


def create_app(
    name: str,
    *,
    routers: Iterable[APIRouter] = (),
    readiness_checks: Mapping[str, ReadinessCheck] | None = None,
    env: Mapping[str, str] | None = None,
) -> FastAPI:
    """Build a service app with /health, /ready, /version, /metrics, JSON logs and faults.

    Settings, build info and faults are read from ``env`` (default ``os.environ``)
    once, here: changing the environment later does not affect this app.
    """
    configure_logging(name, env)
    build = BuildInfo.from_env(name, env)
    faults = Faults.from_env(env)
    metrics = Metrics(build)
    app = FastAPI(title=name, version=build.version)
    app.state.build = build
    app.state.faults = faults
    app.state.metrics = metrics
    app.include_router(_probe_router(build, faults, readiness_checks or {}, metrics))
    for router in routers:
        app.include_router(router)
    app.add_middleware(RequestMiddleware, metrics=metrics, faults=faults, router=app.router)
    if faults.active:
        _log.warning(
            "fault injection active",
            extra={"fault_health": faults.health, "fault_latency_ms": faults.latency_ms},
        )
    return app

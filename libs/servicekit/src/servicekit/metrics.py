"""Prometheus metrics and the request middleware that feeds them."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from servicekit.settings import BuildInfo, Faults

METRICS_CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
# Probes and scrapes: never slowed down by FAULT_LATENCY_MS, logged at DEBUG only.
PROBE_PATHS: Final = frozenset({"/health", "/ready", "/metrics"})
UNMATCHED: Final = "<unmatched>"
_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_log = logging.getLogger("servicekit.access")


class Pool(Protocol):
    """What the pool gauges read: SQLAlchemy's ``QueuePool`` (``engine.pool``) has these."""

    def size(self) -> int: ...

    def checkedout(self) -> int: ...

    def checkedin(self) -> int: ...


class Metrics:
    """One registry per app, so several apps (tests) never clash."""

    def __init__(self, build: BuildInfo) -> None:
        self.service = build.service
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.requests = Counter(
            "http_requests_total",
            "HTTP requests by method, route template and status code.",
            ["service", "method", "path", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "HTTP request latency by method and route template.",
            ["service", "method", "path"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "http_request_errors_total",
            "HTTP requests answered with a 5xx status.",
            ["service", "method", "path", "status"],
            registry=self.registry,
        )
        Gauge(
            "service_build_info",
            "Constant 1, labelled with the running build.",
            ["service", "version", "release", "digest", "commit", "environment"],
            registry=self.registry,
        ).labels(**build.as_dict()).set(1)
        # Database pools (`track_pool`): the DatabasePoolExhausted alert divides checked-out
        # connections by pool_size + max_overflow.
        self.pool_size = Gauge(
            "db_pool_size",
            "Connections a database pool keeps open (pool_size).",
            ["service", "pool"],
            registry=self.registry,
        )
        self.pool_max_overflow = Gauge(
            "db_pool_max_overflow",
            "Connections a database pool may open beyond pool_size (max_overflow).",
            ["service", "pool"],
            registry=self.registry,
        )
        self.pool_checked_out = Gauge(
            "db_pool_checked_out_connections",
            "Database connections in use.",
            ["service", "pool"],
            registry=self.registry,
        )
        self.pool_idle = Gauge(
            "db_pool_idle_connections",
            "Open database connections waiting in the pool.",
            ["service", "pool"],
            registry=self.registry,
        )

    def track_pool(self, pool: Pool, *, max_overflow: int, name: str = "default") -> None:
        """Export ``pool``'s size and use, read at every scrape."""
        labels = (self.service, name)
        self.pool_size.labels(*labels).set_function(lambda: float(pool.size()))
        self.pool_max_overflow.labels(*labels).set(max_overflow)
        self.pool_checked_out.labels(*labels).set_function(lambda: float(pool.checkedout()))
        self.pool_idle.labels(*labels).set_function(lambda: float(pool.checkedin()))

    def observe(self, method: str, path: str, status: int, seconds: float) -> None:
        self.requests.labels(self.service, method, path, str(status)).inc()
        self.latency.labels(self.service, method, path).observe(seconds)
        if status >= 500:
            self.errors.labels(self.service, method, path, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def route_template(scope: Scope, router: Router) -> str:
    """The matched route's path template (``/courses/{course_id}``), bounded cardinality."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    if isinstance(template, str):
        return template
    for candidate in router.routes:
        match, _ = candidate.matches(scope)
        if match is Match.FULL:
            path = getattr(candidate, "path", None)
            if isinstance(path, str):
                return path
    return UNMATCHED


class RequestMiddleware:
    """Pure ASGI middleware: injected latency, metrics and one JSON access-log line."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, faults: Faults, router: Router) -> None:
        self.app = app
        self.metrics = metrics
        self.delay = faults.latency_ms / 1000
        self.error_percent = faults.error_percent
        self.served = 0
        self.router = router

    def _fails(self) -> bool:
        """FAULT_ERROR_PERCENT: whether this request is one of the N in 100 answered 500."""
        self.served += 1
        return (self.served * self.error_percent) // 100 != (
            (self.served - 1) * self.error_percent
        ) // 100

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        probe = scope["path"] in PROBE_PATHS
        try:
            if self.delay and not probe:
                await asyncio.sleep(self.delay)
            if self.error_percent and not probe and self._fails():
                await _answer_500(send_status)
            else:
                await self.app(scope, receive, send_status)
        except Exception:
            status = 500
            raise
        finally:
            elapsed = time.perf_counter() - start
            method = str(scope["method"])
            template = route_template(scope, self.router)
            self.metrics.observe(method, template, status, elapsed)
            _log.log(
                logging.DEBUG if probe else logging.INFO,
                "%s %s %s",
                method,
                scope["path"],
                status,
                extra={
                    "method": method,
                    "path": template,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                },
            )


async def _answer_500(send: Send) -> None:
    """A deliberate failure (FAULT_ERROR_PERCENT): a plain 500 answer."""
    body = b"injected fault"
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 500, "headers": headers})
    await send({"type": "http.response.body", "body": body})


import time

import pytest
from fastapi import APIRouter, HTTPException
from fastapi.testclient import TestClient

from servicekit import create_app

router = APIRouter()


@router.get("/items/{item_id}")
async def get_item(item_id: int) -> dict[str, int]:
    if item_id == 0:
        raise HTTPException(status_code=404, detail="no such item")
    return {"id": item_id}


@router.get("/boom")
async def boom() -> None:
    raise RuntimeError("boom")


def client(env: dict[str, str] | None = None, **kwargs: object) -> TestClient:
    app = create_app("demo", routers=[router], env=env or {}, **kwargs)  # type: ignore[arg-type]
    return TestClient(app, raise_server_exceptions=False)


def test_health_and_version_defaults() -> None:
    c = client()
    assert c.get("/health").json() == {"status": "ok", "service": "demo"}
    assert c.get("/version").json() == {
        "service": "demo",
        "version": "unknown",
        "release": "unknown",
        "digest": "unknown",
        "commit": "unknown",
        "environment": "unknown",
    }


def test_version_reads_build_env() -> None:
    env = {
        "APP_VERSION": "1.2.3",
        "APP_RELEASE": "r42",
        "IMAGE_DIGEST": "sha256:abc",
        "GIT_COMMIT": "deadbeef",
        "ENVIRONMENT": "staging",
    }
    body = client(env).get("/version").json()
    assert body == {
        "service": "demo",
        "version": "1.2.3",
        "release": "r42",
        "digest": "sha256:abc",
        "commit": "deadbeef",
        "environment": "staging",
    }


async def _async_ok() -> bool:
    return True


def _raises() -> bool:
    raise ConnectionError("db down")


def test_ready_runs_checks() -> None:
    ok = client(readiness_checks={"sync": lambda: True, "async": _async_ok})
    resp = ok.get("/ready")
    assert resp.status_code == 200
    assert resp.json()["checks"] == {"sync": True, "async": True}

    bad = client(readiness_checks={"sync": lambda: True, "db": _raises, "no": lambda: False})
    resp = bad.get("/ready")
    assert resp.status_code == 503
    assert resp.json()["status"] == "not_ready"
    assert resp.json()["checks"] == {"sync": True, "db": False, "no": False}


def test_fault_health_breaks_probes_only() -> None:
    c = client({"FAULT_HEALTH": "1"})
    assert c.get("/health").status_code == 503
    ready = c.get("/ready")
    assert ready.status_code == 503
    assert ready.json()["fault"] == "FAULT_HEALTH"
    assert c.get("/items/3").status_code == 200
    assert c.get("/version").status_code == 200


@pytest.mark.parametrize(
    ("environment", "broken"),
    [("staging", True), ("production", True), ("dev", False), ("", False)],
)
def test_fault_environments_scope(environment: str, broken: bool) -> None:
    env = {"FAULT_HEALTH": "true", "FAULT_ENVIRONMENTS": "staging, production"}
    if environment:
        env["ENVIRONMENT"] = environment
    assert (client(env).get("/health").status_code == 503) is broken


def test_fault_latency_skips_probes() -> None:
    c = client({"FAULT_LATENCY_MS": "300"})
    for path in ("/health", "/ready", "/metrics"):
        start = time.perf_counter()
        c.get(path)
        assert time.perf_counter() - start < 0.3
    start = time.perf_counter()
    assert c.get("/items/1").status_code == 200
    assert time.perf_counter() - start >= 0.3


def test_fault_error_percent_fails_that_share_of_traffic_but_no_probe() -> None:
    c = client({"FAULT_ERROR_PERCENT": "50"})
    for path in ("/health", "/ready", "/metrics"):
        assert all(c.get(path).status_code == 200 for _ in range(4))
    statuses = [c.get("/items/1").status_code for _ in range(10)]
    assert statuses.count(500) == 5
    assert statuses.count(200) == 5


def test_bad_latency_value_is_ignored() -> None:
    app = create_app("demo", env={"FAULT_LATENCY_MS": "soon"})
    assert not app.state.faults.active


def test_metrics_use_route_templates() -> None:
    c = client()
    for path in ("/items/1", "/items/2", "/items/0", "/boom", "/nowhere/at/all"):
        c.get(path)
    registry = c.app.state.metrics.registry  # type: ignore[attr-defined]

    def sample(name: str, **labels: str) -> float | None:
        value: float | None = registry.get_sample_value(name, {"service": "demo", **labels})
        return value

    item = {"method": "GET", "path": "/items/{item_id}"}
    assert sample("http_requests_total", status="200", **item) == 2
    assert sample("http_requests_total", status="404", **item) == 1
    assert sample("http_request_duration_seconds_count", **item) == 3
    assert sample("http_request_errors_total", method="GET", path="/boom", status="500") == 1
    assert sample("http_request_errors_total", status="404", **item) is None
    assert sample("http_requests_total", method="GET", path="<unmatched>", status="404") == 1
    text = c.get("/metrics").text
    assert "# TYPE http_requests_total counter" in text
    assert 'service_build_info{commit="unknown"' in text


class _Pool:
    """A pool as SQLAlchemy's QueuePool reports itself."""

    def __init__(self) -> None:
        self.out = 0

    def size(self) -> int:
        return 4

    def checkedout(self) -> int:
        return self.out

    def checkedin(self) -> int:
        return 4 - min(self.out, 4)


def test_track_pool_reads_the_pool_at_every_scrape() -> None:
    c = client()
    pool = _Pool()
    c.app.state.metrics.track_pool(pool, max_overflow=2, name="main")  # type: ignore[attr-defined]
    registry = c.app.state.metrics.registry  # type: ignore[attr-defined]
    labels = {"service": "demo", "pool": "main"}
    assert registry.get_sample_value("db_pool_size", labels) == 4
    assert registry.get_sample_value("db_pool_max_overflow", labels) == 2
    assert registry.get_sample_value("db_pool_checked_out_connections", labels) == 0
    pool.out = 5
    assert registry.get_sample_value("db_pool_checked_out_connections", labels) == 5
    assert registry.get_sample_value("db_pool_idle_connections", labels) == 0
    text = c.get("/metrics").text
    assert 'db_pool_checked_out_connections{pool="main",service="demo"} 5.0' in text


def test_no_pool_no_pool_series() -> None:
    assert "db_pool_size{" not in client().get("/metrics").text

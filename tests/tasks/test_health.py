"""Health probes against the real servicekit app served by uvicorn."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from blocks.catalog import ServiceSpec
from core.errors import HealthCheckFailed
from tasks.health import check_service_health, probe_health
from tests.tasks.servicekit_server import DIGEST_A, DIGEST_B, free_port, servicekit_server

SERVICE = ServiceSpec(name="probe", port=8100)


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with servicekit_server(tmp_path_factory.mktemp("healthy")) as url:
        yield url


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with servicekit_server(tmp_path_factory.mktemp("faulty"), {"FAULT_HEALTH": "1"}) as url:
        yield url


def test_healthy_service_passes_first_time_with_its_version(healthy: str) -> None:
    result = probe_health(healthy, SERVICE, deadline_s=30, expect_digest=DIGEST_A)
    assert result.ok
    assert result.failures == []
    assert result.attempts == 1
    assert result.url == healthy
    assert result.version["digest"] == DIGEST_A
    assert result.version["version"] == "1.2.3"


def test_wrong_digest_names_the_version_endpoint(healthy: str) -> None:
    result = probe_health(healthy, SERVICE, deadline_s=1.0, expect_digest=DIGEST_B, interval_s=0.2)
    assert not result.ok
    assert result.attempts >= 2
    assert result.failures == [f"/version: digest {DIGEST_A}, expected {DIGEST_B}"]


def test_health_fault_names_both_endpoints_and_status(faulty: str) -> None:
    result = probe_health(faulty, SERVICE, deadline_s=1.0, interval_s=0.2)
    assert not result.ok
    assert result.failures == ["/health: answered 503", "/ready: answered 503"]
    assert result.version == {}


def test_nothing_listening_is_a_connection_error() -> None:
    result = probe_health(f"http://127.0.0.1:{free_port()}", SERVICE, deadline_s=0.5)
    assert not result.ok
    assert [f.split(":")[0] for f in result.failures] == ["/health", "/ready"]
    assert all("connection error (ConnectError" in f for f in result.failures)


def test_probe_waits_for_a_service_that_is_starting(tmp_path: Path) -> None:
    with servicekit_server(tmp_path, wait=False) as url:
        result = probe_health(url, SERVICE, deadline_s=120, expect_digest=DIGEST_A, interval_s=0.2)
    assert result.ok, result.failures
    assert result.attempts >= 2


@pytest.mark.parametrize(
    ("address", "deadline", "problem"),
    [("127.0.0.1:8000", 1.0, "http:// or https://"), ("http://127.0.0.1:1", 0, "positive")],
)
def test_bad_arguments_are_refused(address: str, deadline: float, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        probe_health(address, SERVICE, deadline_s=deadline)


def test_check_task_raises_naming_service_url_and_endpoint(faulty: str) -> None:
    with pytest.raises(HealthCheckFailed) as caught:
        check_service_health(faulty, SERVICE, deadline_s=1.0)
    message = str(caught.value)
    assert message.startswith(f"probe at {faulty} failed its health check")
    assert "/health: answered 503; /ready: answered 503" in message


def test_check_task_returns_the_result_when_healthy(healthy: str) -> None:
    result = check_service_health.fn(healthy, SERVICE, deadline_s=30, expect_digest=DIGEST_A)
    assert result.ok
    assert result.service == "probe"

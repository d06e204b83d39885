"""CI waits for its service runs through a Prefect API that blinks: a short outage is
waited out; a long one reports every pending run lost, with the error, never a crash."""

from __future__ import annotations

import time
from collections.abc import Iterator
from uuid import UUID

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings
from prefect.states import Failed

from tasks import dispatch
from tests.plugins.faults import Fault, FaultProxy


@flow(name="dispatch-test-service")
def _service() -> None:
    """Only its name is used: runs are created in a final state."""


@pytest.fixture
def failed_run() -> UUID:
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(_service, state=Failed(message="tests failed in user"))
    return run.id


@pytest.fixture
def api_proxy(
    fault_proxy: type[FaultProxy], monkeypatch: pytest.MonkeyPatch
) -> Iterator[FaultProxy]:
    """The test server's API behind a fault proxy; the client does not retry by itself,
    and the wait polls every 0.25 s (not 2 s), so the outages pass in a second or two."""
    monkeypatch.setattr(dispatch, "POLL_S", 0.25)
    url = str(PREFECT_API_URL.value())
    host = url.split("://", 1)[1].split("/", 1)[0]
    proxy = fault_proxy(host)
    proxied = url.replace(host, proxy.address)
    with temporary_settings({PREFECT_API_URL: proxied, PREFECT_CLIENT_MAX_RETRIES: 0}):
        yield proxy


def test_a_short_api_outage_is_waited_out(failed_run: UUID, api_proxy: FaultProxy) -> None:
    api_proxy.inject(Fault("status", path="/flow_runs/", status=503, times=2))
    api_proxy.inject(Fault("refuse", path="/flow_runs/", first=1, times=2))
    results = dispatch.collect_service_runs.fn({"user": failed_run}, timeout_s=120)
    assert [(r.service, r.stage, r.status) for r in results] == [("user", "worker", "failed")]
    assert "its run ended FAILED: tests failed in user" in results[0].summary
    verdicts = [v for _, path, v in api_proxy.requests if "/flow_runs/" in path]
    assert verdicts[:4] == ["status", "status", "refuse", "refuse"]
    assert verdicts[-1] == "pass"


def test_a_long_api_outage_reports_the_pending_runs_lost(
    failed_run: UUID, api_proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatch, "OUTAGE_BUDGET_S", 3.0)
    api_proxy.inject(Fault("status", path="/flow_runs/", status=503, times=None))
    started = time.monotonic()
    results = dispatch.collect_service_runs.fn({"user": failed_run}, timeout_s=120)
    assert time.monotonic() - started < 30
    assert len(results) == 1
    assert results[0].status == "failed"
    assert "the Prefect API was unavailable for 3s" in results[0].summary
    assert "503" in results[0].summary

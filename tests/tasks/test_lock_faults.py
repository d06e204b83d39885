"""Taking the deploy lock through a failing Prefect API (tasks/locks.py `_acquire`).

The session's Prefect test server is reached through a fault proxy, with the client's own
retries off (PREFECT_CLIENT_MAX_RETRIES=0), so what is waited out is the lock's own
patience. Seen before it: a 503 from the busy SQLite-backed server on the slot's
`increment-with-lease` ended a promotion right after its approval, before anything
deployed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from prefect.exceptions import PrefectHTTPStatusError
from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

from tasks.locks import _acquire, deploy_lock, lock_name
from tests.plugins.faults import Fault, FaultProxy

SLOT = r"/increment-with-lease"


@pytest.fixture
def api(fault_proxy: type[FaultProxy]) -> Iterator[FaultProxy]:
    """This process's Prefect API through a fault proxy, without the client's retries."""
    url = str(PREFECT_API_URL.value())
    host = url.split("://", 1)[1].split("/", 1)[0]
    proxy = fault_proxy(host)
    with temporary_settings(
        {PREFECT_API_URL: url.replace(host, proxy.address), PREFECT_CLIENT_MAX_RETRIES: 0}
    ):
        yield proxy


def _environment() -> str:
    return f"lk-{uuid.uuid4().hex[:8]}"


def test_the_slot_is_taken_through_503s_and_a_refused_connection(api: FaultProxy) -> None:
    api.inject(Fault("status", status=503, path=SLOT, times=2))
    api.inject(Fault("refuse", path=SLOT))
    environment = _environment()
    with deploy_lock(environment, renew_s=30) as held:
        assert held.lost is None
    assert [f.fired for f in api.faults] == [2, 1]
    taken = [v for _, path, v in api.requests if SLOT in path]
    assert taken == ["status", "status", "refuse", "pass"]
    api.clear()
    started = time.monotonic()
    with deploy_lock(environment, renew_s=30):  # released: free at once, no 423 wait
        assert time.monotonic() - started < 10


def test_a_refusal_is_not_waited_out(api: FaultProxy) -> None:
    api.inject(Fault("status", status=403, path=SLOT, body=b'{"detail":"forbidden"}'))
    with pytest.raises(PrefectHTTPStatusError, match="403"):
        _acquire(lock_name(_environment()), patience_s=60)
    assert api.faults[0].fired == 1


def test_an_api_that_stays_down_ends_the_wait_after_its_patience(api: FaultProxy) -> None:
    environment = _environment()
    with deploy_lock(environment, renew_s=30):
        pass  # creates the limit, takes and frees the slot
    api.inject(Fault("status", status=503, path=SLOT, times=None))
    started = time.monotonic()
    with pytest.raises(PrefectHTTPStatusError, match="503"):
        _acquire(lock_name(environment), patience_s=3)
    # asked until the patience ran out (how many times depends on how long each answer
    # took: one took more than the patience under load), then the last error, not a hang
    assert 3 <= time.monotonic() - started < 60
    assert api.faults[0].fired >= 1

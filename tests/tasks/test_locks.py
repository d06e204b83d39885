"""deploy-<env> locks: a killed holder's slot frees within a lease, not Prefect's five minutes.

Expired leases are revoked by the server's repossessor service, which an ephemeral test
server does not run: this test uses the full `prefect server start` on PostgreSQL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from tasks.locks import LEASE_S, lock_name
from tests.plugins.postgres import PostgresPrefect

HOLDER = textwrap.dedent(
    """
    import sys, time
    from prefect import flow
    from tasks.locks import deploy_lock

    @flow
    def hold(environment: str) -> None:
        with deploy_lock(environment):
            print("holding", flush=True)
            time.sleep(600)

    hold(sys.argv[1])
    """
)


def _active(name: str, api_url: str) -> int:
    with (
        temporary_settings(updates={PREFECT_API_URL: api_url}),
        get_client(sync_client=True) as client,
    ):
        return client.read_global_concurrency_limit_by_name(name).active_slots


def test_a_killed_holder_frees_the_environment_within_one_lease(
    postgres_prefect: PostgresPrefect,
) -> None:
    environment = f"lk-{uuid.uuid4().hex[:8]}"
    api = postgres_prefect.api_url
    env = {**os.environ, "PREFECT_API_URL": api}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, environment],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "holding"
        assert _active(lock_name(environment), api) == 1
        os.kill(holder.pid, signal.SIGKILL)  # no hook, no release: the process is gone
        holder.wait(timeout=30)
        killed = time.monotonic()
        while _active(lock_name(environment), api) and time.monotonic() - killed < 4 * LEASE_S:
            time.sleep(2)
        freed_after = time.monotonic() - killed
    finally:
        if holder.poll() is None:
            holder.kill()
    assert _active(lock_name(environment), api) == 0
    assert freed_after < 2 * LEASE_S, f"the slot stayed taken {freed_after:.0f}s"

"""Prefect global concurrency limits as locks: one deploy into an environment at a time.

`deploy-<env>` is held by a whole promotion or rollback of `env`, and by each of CI's
deploys into it: two CI runs never deploy into dev at once, and CI never deploys into
an environment a promotion is changing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from uuid import UUID

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from prefect.states import Crashed

from tasks.process import run_logger

LEASE_S = 60


def lock_name(environment: str) -> str:
    """The global concurrency limit that serialises deploys into `environment`."""
    return f"deploy-{environment}"


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def ensure_deploy_lock(environment: str) -> bool:
    """Create the `deploy-<env>` global concurrency limit (1 slot) if it is missing.

    Returns True when another run holds it now (this run will wait), and says so.
    """
    name = lock_name(environment)
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=1, active=True)
                )
            except PrefectHTTPStatusError as exc:  # created by a concurrent run
                if exc.response.status_code != 409:
                    raise
            run_logger().info("created global concurrency limit %s (1 slot)", name)
            return False
    busy = limit.active_slots >= limit.limit
    if busy:
        run_logger().info("another deploy into %s is running: waiting for %s", environment, name)
    return busy


@contextmanager
def deploy_lock(environment: str) -> Iterator[str]:
    """Hold `deploy-<env>` (created if missing; strict) for the duration of the block."""
    name = lock_name(environment)
    ensure_deploy_lock(environment)
    # The lease is renewed while the holder lives; a killed holder's slot frees after at
    # most LEASE_S (the server's minimum), not Prefect's default five minutes.
    with concurrency(name, occupy=1, strict=True, lease_duration=LEASE_S):
        run_logger().info("holding %s: nothing else deploys into %s now", name, environment)
        yield name


def mark_crashed(flow_run_id: str, message: str) -> bool:
    """Mark a dead holder's flow run Crashed, unless it already ended; True if marked.

    A run whose process was killed stays Running on the server (nothing reports its
    death); the run that finds its leftovers says so in the UI.
    """
    with get_client(sync_client=True) as client:
        try:
            found = client.read_flow_run(UUID(flow_run_id))
        except ObjectNotFound:
            return False
        if found.state is None or found.state.is_final():
            return False
        client.set_flow_run_state(UUID(flow_run_id), Crashed(message=message), force=True)
    run_logger().warning("flow run %s marked Crashed: %s", flow_run_id, message)
    return True

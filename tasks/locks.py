"""Prefect global concurrency limits as locks: one deploy into an environment at a time.

`deploy-<env>` is held by a whole promotion or rollback of `env`, and by each of CI's
deploys into it: two CI runs never deploy into dev at once, and CI never deploys into
an environment a promotion is changing.

The slot is held by a lease the holder renews (`LEASE_S`, the server's minimum, so a
killed holder's slot frees within a minute). The renewals are this module's own, not
Prefect's: Prefect's give up after three quick attempts and then inject a cancellation
into the holder's thread at whatever instruction it runs, which can land in the middle
of a deploy or of its rollback. Here a renewal that fails is retried for as long as the
lease still runs (a Prefect API outage shorter than that is survived); only a lease the
server no longer holds (410/404: expired, revoked, the server lost it) or one that could
not be renewed before it expired is lost. A lost lease interrupts nothing: the deploy
asks `check_deploy_lock` at its safe points (before each wave, before the ledger records
the release) and stops there with `DeployLockLost`, which its rollback handles like any
other failure.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from uuid import UUID

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings
from prefect.states import Crashed

from core.errors import DeployError, DeployLockLost
from tasks.process import run_logger

LEASE_S = 60
RENEW_S = 10.0
"""Default seconds between renewals (the user setting ELICE_LOCK_RENEW_S)."""
RETRY_S = 1.0
"""Seconds between attempts while renewals fail."""
MARGIN_S = 5.0
"""A lease not renewed this close to its expiry counts as lost (the server frees it)."""
GONE = frozenset({404, 410})
"""What the server answers for a lease it no longer holds."""
ACQUIRE_PATIENCE_S = 60.0
"""How long taking the slot waits out an API that fails (5xx, unreachable): nothing is
held or changed yet, so waiting is safe; the client's own retries may be fewer (a 503
from a busy SQLite-backed server, seen under load, ended a promotion right after its
approval)."""


@dataclass
class HeldLease:
    """A held deploy lock: its lease, and why it was lost (None while it holds)."""

    name: str
    lease_id: UUID
    lost: str | None = None
    renewal_failures: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def check(self, where: str) -> None:
        """Raise DeployLockLost when the lease was lost; `where` names the safe point."""
        if self.lost is not None:
            msg = f"the deploy lock {self.name} was lost ({self.lost}); stopped {where}"
            raise DeployLockLost(msg)


_HELD: contextvars.ContextVar[HeldLease | None] = contextvars.ContextVar(
    "elice_deploy_lease", default=None
)


def check_deploy_lock(where: str) -> None:
    """A safe point: raise DeployLockLost if the deploy lock held here was lost.

    Outside a `deploy_lock` block this does nothing.
    """
    held = _HELD.get()
    if held is not None:
        held.check(where)


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


@dataclass(frozen=True)
class ApiFailure:
    """A failed call of the lease's API, classified once for taking and renewing it."""

    what: str
    """For the log: "HTTP 503", or the error that left no answer."""
    status: int | None = None
    """The server's answer; None: there was none (refused, reset, timed out)."""
    retry_after_s: float = 1.0

    @property
    def busy(self) -> bool:
        """Another run holds the slot (423): wait `retry_after_s`, then ask again."""
        return self.status == 423

    @property
    def gone(self) -> bool:
        """The server no longer holds the lease."""
        return self.status in GONE

    @property
    def transient(self) -> bool:
        """It may pass: no answer, or a 5xx."""
        return self.status is None or self.status >= 500


def api_failure(exc: httpx.HTTPError | OSError) -> ApiFailure:
    """The failure of a call through Prefect's client (an HTTP status or no answer)."""
    if isinstance(exc, PrefectHTTPStatusError):
        code = exc.response.status_code
        retry_after = float(exc.response.headers.get("Retry-After", 1))
        return ApiFailure(f"HTTP {code}", code, retry_after)
    return ApiFailure(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


def _renew_once(client: SyncPrefectClient, held: HeldLease) -> str | None:
    """One renewal: None when renewed, else what failed. Marks `held` lost on 410/404."""
    try:
        client.renew_concurrency_lease(held.lease_id, LEASE_S)
    except (httpx.HTTPError, OSError) as exc:
        failure = api_failure(exc)
        if failure.gone:
            held.lost = f"the Prefect server no longer holds its lease ({failure.what})"
        return failure.what
    return None


def _keep(held: HeldLease, renew_s: float) -> None:
    """Renew `held` every `renew_s`; retry failures until the lease would expire."""
    renewed_at = time.monotonic()
    failing: str | None = None
    # Each attempt is one request: the retries and their budget are this loop's.
    with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}), get_client(sync_client=True) as c:
        while not held._stop.wait(renew_s if failing is None else RETRY_S):
            error = _renew_once(c, held)
            if held.lost is not None:
                break
            if error is None:
                if failing is not None:
                    run_logger().info("%s: lease renewed again", held.name)
                renewed_at, failing = time.monotonic(), None
                continue
            held.renewal_failures += 1
            if failing is None:
                log = run_logger()
                log.warning("%s: renewing its lease failed (%s): retrying", held.name, error)
            failing = error
            unrenewed = time.monotonic() - renewed_at
            if unrenewed > LEASE_S - MARGIN_S:
                held.lost = f"not renewed for {unrenewed:.0f}s, the last attempt: {failing}"
                break
    if held.lost is not None:
        why = held.lost
        run_logger().error("%s lost: %s; the deploy stops at its next safe point", held.name, why)


def _acquire(name: str, patience_s: float = ACQUIRE_PATIENCE_S) -> UUID:
    """Wait for the slot of `name` and take it with a lease; its lease id.

    The server answers 423 with Retry-After while another run holds the slot. A failing
    API (5xx, refused, reset, timed out) is asked again every `RETRY_S` for `patience_s`;
    an attempt whose answer was lost after the server took the slot leaves a lease
    nobody renews, which frees within `LEASE_S`, so the next attempts wait for it (423)
    rather than hold the slot twice.

    Raises:
        PrefectHTTPStatusError: the server refused (4xx other than 423), or still
            failed after `patience_s`.
        httpx.HTTPError: the API was still unreachable after `patience_s`.
    """
    deadline = time.monotonic() + patience_s
    with get_client(sync_client=True) as client:
        while True:
            try:
                answer = client.increment_concurrency_slots_with_lease(
                    names=[name], slots=1, mode="concurrency", lease_duration=LEASE_S
                )
            except (httpx.HTTPError, OSError) as exc:
                failure = api_failure(exc)
                if failure.busy:
                    time.sleep(failure.retry_after_s)
                    continue
                if not failure.transient or time.monotonic() > deadline:
                    raise
                _acquire_failed(name, failure.what)
                continue
            body = answer.json()
            if not body.get("limits"):
                msg = f"the global concurrency limit {name} does not exist"
                raise DeployError(msg)
            return UUID(body["lease_id"])


def _acquire_failed(name: str, why: str) -> None:
    run_logger().warning(
        "%s: the Prefect API failed to hand out the slot (%s): asking again", name, why
    )
    time.sleep(RETRY_S)


def _release(held: HeldLease) -> None:
    """Give the slot back; if the API cannot be reached, the lease expires by itself."""
    if held.lost is not None:
        return
    try:
        with get_client(sync_client=True) as client:
            client.release_concurrency_slots_with_lease(held.lease_id)
    except Exception as exc:  # noqa: BLE001 - the lease frees itself within LEASE_S
        run_logger().warning(
            "%s: could not release its lease (%s); it frees within %ss", held.name, exc, LEASE_S
        )


@contextmanager
def deploy_lock(environment: str, renew_s: float = RENEW_S) -> Iterator[HeldLease]:
    """Hold `deploy-<env>` (created if missing; strict) for the duration of the block.

    The lease is renewed every `renew_s` seconds (ELICE_LOCK_RENEW_S) by a thread of
    its own; the block calls `check_deploy_lock` at its safe points.
    """
    name = lock_name(environment)
    ensure_deploy_lock(environment)
    held = HeldLease(name=name, lease_id=_acquire(name))
    keeper = threading.Thread(
        target=contextvars.copy_context().run,
        args=(_keep, held, renew_s),
        name=f"lease-{name}",
        daemon=True,
    )
    keeper.start()
    token = _HELD.set(held)
    try:
        run_logger().info("holding %s: nothing else deploys into %s now", name, environment)
        yield held
    finally:
        _HELD.reset(token)
        held._stop.set()
        keeper.join(timeout=5)
        _release(held)


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

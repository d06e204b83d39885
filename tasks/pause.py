"""Waiting in a paused flow run for an answer, in a way a forced state cannot knock over.

Prefect's `pause_flow_run` waits until the run is Running again. Anyone with API access
can force a waiting run to Scheduled or Pending instead: Prefect's pause then waits there
until its timeout, and no answer can reach it (the server resumes Paused runs only), so
a rejection cannot end it. `pause_for_answer` puts such a run back to Paused with the
same form and the time it had left, and reports it (`on_forced`) so the caller can audit
it. A cancellation (Cancelling, Cancelled) or another final state ends the wait with
`PauseInterrupted`: those stop a release, they never ship one.

The pause key is random, so nobody can write an answer for a pause before it exists.

A Prefect API that stops answering during the wait (refused or reset connections,
timeouts, 5xx, 429) is waited out until the pause's own timeout: the wait looks again
every `poll_s`, and an answer given before or after the outage is read once the API
answers. An outage never counts as an answer, and never ends the wait early.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State, StateType
from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout
from prefect.input.run_input import (
    Keyset,
    RunInput,
    keyset_from_paused_state,
    run_input_subclass_from_type,
)
from prefect.states import Paused
from prefect.utilities.engine import propose_state_sync

from core.errors import PauseInterrupted
from tasks.process import run_logger

T = TypeVar("T")

# States that end a wait: the run is being stopped (or is over), never resumed.
ENDS_WAIT = frozenset(
    {
        StateType.CANCELLING,
        StateType.CANCELLED,
        StateType.COMPLETED,
        StateType.FAILED,
        StateType.CRASHED,
    }
)


def _paused(key: str, keyset: Keyset | None, timeout_s: float) -> State[Any]:
    state: State[Any] = Paused(
        timeout_seconds=max(1, int(timeout_s)), reschedule=False, pause_key=key
    )
    if keyset is not None:
        state.state_details.run_input_keyset = {str(k): v for k, v in keyset.items()}
    return state


def api_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the Prefect API could not answer now (worth waiting out)."""
    if isinstance(exc, httpx.HTTPStatusError):
        code = exc.response.status_code
        return code >= 500 or code in (408, 429)
    return isinstance(exc, (httpx.TransportError, OSError))


def through_outage(call: Callable[[], T], until: float, poll_s: float, what: str) -> T:
    """`call()`, called again every `poll_s` while the Prefect API is unavailable, up to
    the monotonic time `until`; an outage is logged when it starts and when it ends."""
    down_since: float | None = None
    while True:
        try:
            result = call()
        except Exception as exc:
            if not api_unavailable(exc) or time.monotonic() >= until:
                raise
            if down_since is None:
                down_since = time.monotonic()
                run_logger().warning(
                    "the Prefect API did not answer while %s (%s): still waiting",
                    what,
                    type(exc).__name__,
                )
            time.sleep(poll_s)
            continue
        if down_since is not None:
            gone = time.monotonic() - down_since
            run_logger().info("the Prefect API answers again after %.0fs (%s)", gone, what)
        return result


def pause_for_answer(
    form: type[Any],
    *,
    timeout_s: float,
    poll_s: float,
    on_forced: Callable[[str], None],
) -> RunInput:
    """Pause the current flow run until it is resumed with input of type `form`.

    Returns the input (loading it raises when the run was resumed without a valid one).

    Raises:
        FlowPauseTimeout: `timeout_s` passed without a resume.
        PauseInterrupted: the run was cancelled or set to a final state meanwhile.
        RuntimeError: not in a flow run, or the server would not pause it.
    """
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        msg = "pause_for_answer runs inside a flow run only"
        raise RuntimeError(msg)
    run_id = context.flow_run.id
    kind = cast("type[RunInput]", run_input_subclass_from_type(form))
    key = f"approval-{secrets.token_hex(8)}"
    keyset = keyset_from_paused_state(_paused(key, None, timeout_s))
    expires = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        state = through_outage(
            lambda: propose_state_sync(client, _paused(key, keyset, timeout_s), flow_run_id=run_id),
            expires,
            poll_s,
            "pausing for an approval",
        )
        if not state.is_paused():
            msg = f"the server would not pause the run: it is {state.type.value}"
            raise RuntimeError(msg)
        # after the pause: the server deletes what is stored under a new pause's keys
        through_outage(lambda: kind.save(keyset), expires, poll_s, "saving the approval form")
        while (left := expires - time.monotonic()) > 0:
            time.sleep(min(poll_s, left))
            current = through_outage(
                lambda: client.read_flow_run(run_id).state, expires, poll_s, "awaiting approval"
            )
            if current is None or current.is_paused():
                continue
            if current.is_running():  # sync here: no loop
                loaded = through_outage(
                    lambda: kind.load(keyset), expires, poll_s, "reading the answer"
                )
                return cast("RunInput", loaded)
            if current.type in ENDS_WAIT:
                raise PauseInterrupted(current.name or current.type.value)
            on_forced(current.name or current.type.value)
            through_outage(
                lambda: client.set_flow_run_state(
                    run_id, _paused(key, keyset, expires - time.monotonic()), force=True
                ),
                expires,
                poll_s,
                "pausing again",
            )
    msg = "Flow run was paused and never resumed."
    raise FlowPauseTimeout(msg)

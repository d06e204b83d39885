"""Waiting in a paused flow run for an answer, in a way a forced state cannot knock over.

Prefect's `pause_flow_run` waits until the run is Running again. Anyone with API access
can force a waiting run to Scheduled or Pending instead: Prefect's pause then waits there
until its timeout, and no answer can reach it (the server resumes Paused runs only), so
a rejection cannot end it. `pause_for_answer` puts such a run back to Paused with the
same form and the time it had left, and reports it (`on_forced`) so the caller can audit
it. A cancellation (Cancelling, Cancelled) or another final state ends the wait with
`PauseInterrupted`: those stop a release, they never ship one.

The pause key is random, so nobody can write an answer for a pause before it exists.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any, cast

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
        state = propose_state_sync(client, _paused(key, keyset, timeout_s), flow_run_id=run_id)
        if not state.is_paused():
            msg = f"the server would not pause the run: it is {state.type.value}"
            raise RuntimeError(msg)
        # after the pause: the server deletes what is stored under a new pause's keys
        kind.save(keyset)
        while (left := expires - time.monotonic()) > 0:
            time.sleep(min(poll_s, left))
            current = client.read_flow_run(run_id).state
            if current is None or current.is_paused():
                continue
            if current.is_running():
                return cast("RunInput", kind.load(keyset))  # sync here: no loop
            if current.type in ENDS_WAIT:
                raise PauseInterrupted(current.name or current.type.value)
            on_forced(current.name or current.type.value)
            client.set_flow_run_state(
                run_id, _paused(key, keyset, expires - time.monotonic()), force=True
            )
    msg = "Flow run was paused and never resumed."
    raise FlowPauseTimeout(msg)

"""Running external tools: one place that starts processes, captures and trims output.

Tool slots: the CI flow's thread pool is wide, so a task waiting for the one before it
never holds back one that could run; what is bounded (by the cores, or what the flow's
runner says) is how many tools run at once. `run_tool`, the pytest fork server and the
image build each hold a slot while their process works; a thread that holds one can
start more tools inside it without taking another.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.client.schemas.objects import State
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from prefect.tasks import exponential_backoff

from core.errors import ToolError

EXCERPT_LINES = 40


class _Slots:
    """At most `size` holders at once, in this process; reentrant in one thread."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._gate = threading.BoundedSemaphore(size)
        self._held = threading.local()

    @contextmanager
    def hold(self) -> Iterator[None]:
        if getattr(self._held, "depth", 0):
            self._held.depth += 1
            try:
                yield
            finally:
                self._held.depth -= 1
            return
        with self._gate:
            self._held.depth = 1
            try:
                yield
            finally:
                self._held.depth = 0


_slots = _Slots(os.cpu_count() or 2)
_slots_lock = threading.Lock()


def set_tool_slots(size: int) -> None:
    """How many tools may run at once from now on (tools running keep their slot).

    Raises:
        ValueError: `size` is below 1.
    """
    global _slots  # noqa: PLW0603 - one bound per process, set by the flow's runner
    if size < 1:
        msg = f"tool slots must be at least 1, got {size}"
        raise ValueError(msg)
    with _slots_lock:
        if _slots.size != size:
            _slots = _Slots(size)


def tool_slots() -> int:
    """How many tools may run at once."""
    return _slots.size


@contextmanager
def tool_slot() -> Iterator[None]:
    """Hold one tool slot while the block runs (at once when this thread holds one)."""
    with _slots.hold():
        yield


@dataclass(frozen=True)
class ToolRun:
    """What a finished process did."""

    args: tuple[str, ...]
    returncode: int
    output: str
    seconds: float

    @property
    def ok(self) -> bool:
        """True when the tool exited 0."""
        return self.returncode == 0

    def excerpt(self, lines: int = EXCERPT_LINES) -> str:
        """The last `lines` lines of the combined output."""
        return "\n".join(self.output.rstrip().splitlines()[-lines:])


def which(tool: str) -> str:
    """The absolute path of `tool`, looked up beside this interpreter first.

    Raises:
        ToolError: the tool is not installed.
    """
    here = Path(sys.executable).parent / tool
    if here.exists():
        return str(here)
    found = shutil.which(tool)
    if found is None:
        msg = f"{tool} is not installed (looked beside {sys.executable} and on PATH)"
        raise ToolError(msg)
    return found


def run_tool(
    args: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
    input_text: str | None = None,
) -> ToolRun:
    """Run a tool to completion, capturing stdout and stderr together.

    A non-zero exit is returned, not raised: the caller decides what it means.

    Raises:
        ToolError: the tool could not be started or timed out.
    """
    full_env = {**os.environ, **(env or {})}
    started = time.monotonic()
    try:
        with tool_slot():
            done = subprocess.run(
                list(args),
                cwd=cwd,
                env=full_env,
                input=input_text,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
                check=False,
            )
    except FileNotFoundError as exc:
        msg = f"cannot run {args[0]}: {exc.strerror}"
        raise ToolError(msg) from exc
    except subprocess.TimeoutExpired as exc:
        msg = f"{' '.join(args[:3])} timed out after {timeout:.0f}s"
        raise ToolError(msg) from exc
    return ToolRun(tuple(args), done.returncode, done.stdout or "", time.monotonic() - started)


def run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The Prefect run logger inside a flow or task, a module logger outside (e.g. `.fn`)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("elice")


def retry_on_tool_error(task: object, task_run: object, state: State[Any]) -> bool:  # noqa: ARG001
    """Prefect retry condition: retry only when a tool or daemon could not run.

    A lint finding, a failing test or a refused image is final: retrying cannot help.
    """
    try:
        state.result()
    except ToolError:
        return True
    except Exception:  # noqa: BLE001 - anything else is not worth a retry
        return False
    return False


STAGE_RETRY_OPTIONS: dict[str, Any] = {
    "retries": 2,
    "retry_delay_seconds": exponential_backoff(backoff_factor=1),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_on_tool_error,
}
"""Task options for a step that runs a tool: exponential backoff with jitter, ToolError only."""

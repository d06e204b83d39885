"""What the stack reports: each part's state, and each step of `ensure_stack` as it runs."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StackPart(BaseModel):
    """One part of the stack as `stack_status()` sees it."""

    model_config = ConfigDict(frozen=True)

    name: str
    state: Literal["running", "stopped", "external", "present", "missing"]
    address: str = ""


# --- progress --------------------------------------------------------------------------


StepState = Literal["start", "done", "failed", "info"]


class StackStep(BaseModel):
    """One line of `ensure_stack`'s progress: a step started, done or failed, or a fact."""

    model_config = ConfigDict(frozen=True)

    part: str = Field(
        description="engine, registry, base-image, pause-image, prefect, system, "
        "alert-log, alertmanager, prometheus"
    )
    state: StepState
    text: str = Field(description="What starts, what it ended as, or the fact")
    seconds: float | None = Field(default=None, description="How long the step took")

    def outcome(self) -> str:
        """How a step ended, e.g. `ready in 1.2s` (the text alone for start and info)."""
        if self.state == "failed":
            return f"failed after {self.seconds or 0.0:.1f}s"
        if self.state == "done":
            return f"{self.text} in {self.seconds or 0.0:.1f}s"
        return self.text

    def line(self) -> str:
        """The step as one plain line, e.g. `engine: starting podman API service ...`."""
        suffix = " ..." if self.state == "start" else ""
        return f"{self.part}: {self.outcome()}{suffix}"


Progress = Callable[[StackStep], None]


class Steps:
    """Reports steps to an optional `Progress` callback."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress

    def _emit(self, part: str, state: StepState, text: str, seconds: float | None = None) -> None:
        if self.progress is not None:
            self.progress(StackStep(part=part, state=state, text=text, seconds=seconds))

    def info(self, part: str, text: str) -> None:
        self._emit(part, "info", text)

    def start(self, part: str, text: str) -> float:
        self._emit(part, "start", text)
        return time.monotonic()

    def done(self, part: str, started: float, text: str = "ready") -> None:
        self._emit(part, "done", text, round(time.monotonic() - started, 1))

    def failed(self, part: str, started: float) -> None:
        self._emit(part, "failed", "failed", round(time.monotonic() - started, 1))

    @contextlib.contextmanager
    def step(self, part: str, text: str, done: str = "ready") -> Iterator[None]:
        started = self.start(part, text)
        try:
            yield
        except BaseException:
            self.failed(part, started)
            raise
        self.done(part, started, done)

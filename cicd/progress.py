"""Progress of a flow run in this process: a live services x stages table, or plain lines.

`cicd ci` and `cicd promote` call their flow in the CLI's own process. `run_flow` calls
it here, in this thread (so Ctrl-C and signals reach the flow as before), under a unique
run name (`ci-cli-<hex>`), while a background thread polls the Prefect API twice a
second for that run and its task runs and places each task run at (service, stage):

- on a terminal: a live table (rich `Live`), the run's UI link above it, the run's own
  steps (workspace, plan, backup...) under it, and the approval command while paused;
- otherwise (a pipe, a CI log): plain lines, one per stage as it finishes
  (`auth ruff passed (0.1s)`), no cursor control;
- at the end, the failures: each failed stage's summary and the tool's excerpt.

Prefect's console log stream is held back meanwhile (the logs still reach the API, and
the UI link shows them); `--verbose` skips all of this and prints the stream as before.

Where a task run is: its name, when the task's `task_run_name` names the service
(`publish-image-auth`, `deploy-auth-to-dev`). The check stages' tasks (lock-service,
sync-service, run-ruff...) carry Prefect's default names (`run-ruff-3fa`) and the API
does not return task parameters, so their service comes, in this order, from: the only
service of the run; the first log line of the task run or its failure message, which
by this project's convention starts with the service (`auth: ruff passed in 0.4s`); or
a task run it waits for or that waits for it (`task_inputs["wait_for"]`: pytest waits
for the checks, which wait for sync, which waits for lock). A stage still unplaced is
counted under the table; CI's outcome places every stage exactly at the end.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol
from uuid import UUID, uuid4

from prefect import Flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterName,
    LogFilter,
    LogFilterTaskRunId,
)
from prefect.client.schemas.objects import FlowRun, State, StateType, TaskRun, TaskRunResult
from prefect.client.schemas.sorting import TaskRunSort
from prefect.logging.handlers import PrefectConsoleHandler
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from flows.stages import (
    CI_STAGES,
    CI_STEPS,
    PROMOTE_STAGES,
    PROMOTE_STEPS,
    ROLLBACK_STAGES,
    ROLLBACK_STEPS,
)
from tasks.notify import flow_run_url

POLL_S = 0.5
SETTLE_S = 5.0
"""After the flow returns: how long at most to wait for the API to catch up with its end."""
STEADY_POLLS = 2
"""...and how many polls in a row must find nothing new and nothing running (about 1 s)."""
PAGE = 200
"""The server's largest page (PREFECT_SERVER_API_DEFAULT_LIMIT)."""

FINAL = frozenset({"passed", "cached", "failed", "cancelled", "skipped"})
ENDED = frozenset({StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED})
"""A task run's state types once it has ended."""
STYLES = {
    "passed": "green",
    "cached": "cyan",
    "failed": "bold red",
    "cancelled": "yellow",
    "skipped": "dim",
    "running": "yellow",
    "retrying": "yellow",
    "waiting": "dim",
    "paused": "magenta",
}
_DEFAULT_NAME = re.compile(r"^(?P<task>.+)-(?:[0-9a-f]{3}|\d+)$")
"""Prefect's task run name without a `task_run_name`: `<task name>-<3 hex of its key>`."""
_EXCEPTION = re.compile(r"\b[A-Z]\w*: (?P<message>.+)", re.DOTALL)


class StageResultLike(Protocol):
    """What the end of a run reads of a stage's result (core.records.StageResult)."""

    @property
    def service(self) -> str: ...
    @property
    def stage(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def seconds(self) -> float: ...
    @property
    def summary(self) -> str: ...
    @property
    def excerpt(self) -> str: ...


class StageCell(NamedTuple):
    """One cell of the table: a service's stage, its state and, when known, its seconds."""

    service: str
    stage: str
    state: str
    seconds: float | None = None


# --- rendering (pure) -------------------------------------------------------------------


def cell_text(state: str, seconds: float | None = None) -> Text:
    """A table cell: a mark, the state where the mark is not enough, and the seconds."""
    marks = {"passed": "✓", "failed": "✗", "running": "…", "waiting": "·", "skipped": "-"}
    words = [marks.get(state, state)]
    if state in {"passed", "failed", "running"} and seconds is not None:
        words.append(f"{seconds:.1f}s")
    elif state == "failed":
        words.append("failed")
    return Text(" ".join(words), style=STYLES.get(state, ""))


def stage_line(cell: StageCell) -> str:
    """The plain line of a finished stage: `auth ruff passed (0.1s)`."""
    where = f"{cell.service} {cell.stage}" if cell.service else cell.stage
    seconds = f" ({cell.seconds:.1f}s)" if cell.seconds is not None else ""
    return f"{where} {cell.state}{seconds}"


def stage_table(
    cells: Iterable[StageCell | tuple[str, str, str]],
    stages: Sequence[str] = (),
    *,
    title: str | None = None,
) -> Table:
    """Services x stages: one row per service (first seen first), one column per stage.

    Columns: `stages` in their order, then any other stage in `cells` as first seen.
    A stage a service has no cell for stays empty.
    """
    given = [c if isinstance(c, StageCell) else StageCell(*c) for c in cells]
    columns = list(dict.fromkeys([*stages, *(c.stage for c in given)]))
    rows: dict[str, dict[str, StageCell]] = {}
    for cell in given:
        rows.setdefault(cell.service, {})[cell.stage] = cell
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    table.add_column("service", style="bold", no_wrap=True)
    for column in columns:
        table.add_column(column, no_wrap=True)
    for service, by_stage in rows.items():
        row: list[RenderableType] = [service]
        for column in columns:
            found = by_stage.get(column)
            row.append(cell_text(found.state, found.seconds) if found else "")
        table.add_row(*row)
    return table


# --- which task run is which stage ------------------------------------------------------


@dataclass(frozen=True)
class StageView:
    """How one flow's task runs show: stages of a service, or steps of the run as a whole."""

    flow: str
    stages: tuple[str, ...]
    """Every stage's column, in pipeline order."""
    shown: tuple[str, ...]
    """Columns shown from the start (with `waiting` cells); others appear when they run."""
    tasks: Mapping[str, str]
    """Task name -> stage (flows/stages.py); a run named `<task>-<service>[-...]` is placed
    at that service, a run with Prefect's default name by its logs."""
    steps: Mapping[str, str] = field(default_factory=dict)
    """Task name -> step of the run as a whole."""
    hidden: frozenset[str] = frozenset()
    """Stages that only link others (their runs are placed, never shown)."""


CHECK_STAGES = ("lock", "sync", "ruff", "mypy", "bandit", "pytest")

CI_VIEW = StageView(
    flow="ci",
    stages=(*CHECK_STAGES, "image", "scan", "sbom", "deploy", "health", "record"),
    shown=CHECK_STAGES,
    tasks=CI_STAGES,
    steps=CI_STEPS,
    hidden=frozenset({"fingerprint"}),
)

PROMOTE_VIEW = StageView(
    flow="promote",
    stages=("image", "smoke", "deploy", "health", "baseline", "regression"),
    shown=("image", "smoke", "deploy", "health", "baseline", "regression"),
    tasks=PROMOTE_STAGES,
    steps=PROMOTE_STEPS,
)

ROLLBACK_VIEW = StageView(
    flow="rollback",
    stages=("rollback",),
    shown=("rollback",),
    tasks=ROLLBACK_STAGES,
    steps=ROLLBACK_STEPS,
)


@dataclass(frozen=True)
class Placed:
    """Where one task run shows."""

    stage: str
    service: str | None
    """None: a step of the run as a whole, or a stage whose service is not known yet."""
    step: bool = False


def _templates(view: StageView, services: Sequence[str]) -> list[tuple[re.Pattern[str], str]]:
    names = "|".join(re.escape(s) for s in sorted(services, key=len, reverse=True)) or "(?!)"
    return [
        (re.compile(f"^{re.escape(task)}-(?P<service>{names})(?:-.+)?$"), stage)
        for task, stage in view.tasks.items()
    ]


def named_service(text: str, services: Sequence[str]) -> str | None:
    """The service a message is about, when it starts with one: `auth: ...`, `auth at ...`."""
    for service in sorted(services, key=len, reverse=True):
        if text.startswith(service) and text[len(service) : len(service) + 1] in {":", " "}:
            return service
    return None


def _waits_for(run: TaskRun) -> set[UUID]:
    """The task runs `run` waits for (`wait_for=`): a flow's explicit order of stages.

    Not its other inputs: Prefect links a parameter to any task run that was handed the
    same object, so a `catalog` input links to the lock runs of every service.
    """
    return {
        item.id for item in run.task_inputs.get("wait_for", []) if isinstance(item, TaskRunResult)
    }


def place_runs(
    runs: Sequence[TaskRun],
    view: StageView,
    services: Sequence[str],
    *,
    run_services: Sequence[str] | None = None,
    hints: Mapping[UUID, str] | None = None,
) -> dict[UUID, Placed]:
    """Place the task runs of one flow run; runs that are none of the view's are left out.

    Args:
        runs: the flow run's task runs (nested ones, run inside another task, are left out).
        view: the flow's stages and steps.
        services: every service the configuration knows (to read names and messages).
        run_services: the services this run checks, when known in advance.
        hints: task run id -> service, from the run's logs.
    """
    patterns = _templates(view, services)
    hints = hints or {}
    placed: dict[UUID, Placed] = {}
    for run in runs:
        if run.task_inputs.get("__parents__"):
            continue
        found = next(
            ((m, stage) for pattern, stage in patterns if (m := pattern.match(run.name))), None
        )
        if found is not None:
            placed[run.id] = Placed(found[1], found[0].group("service"))
            continue
        default = _DEFAULT_NAME.match(run.name)
        task = default.group("task") if default else run.name
        if task in view.steps:
            placed[run.id] = Placed(view.steps[task], None, step=True)
        elif task in view.tasks:
            only = run_services[0] if run_services and len(run_services) == 1 else None
            message = (run.state.message or "") if run.state else ""
            failure = _EXCEPTION.search(message)
            service = (
                only
                or hints.get(run.id)
                or (named_service(failure.group("message"), services) if failure else None)
            )
            placed[run.id] = Placed(view.tasks[task], service)
    _spread_services(runs, placed)
    return placed


def _spread_services(runs: Sequence[TaskRun], placed: dict[UUID, Placed]) -> None:
    """A stage's service spreads to the stages it waits for and that wait for it."""
    parent = {run_id: run_id for run_id, p in placed.items() if not p.step}

    def root(node: UUID) -> UUID:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for run in runs:
        if run.id not in parent:
            continue
        for upstream in _waits_for(run):
            if upstream in parent:
                parent[root(upstream)] = root(run.id)
    services: dict[UUID, set[str]] = {}
    for run_id in parent:
        if (service := placed[run_id].service) is not None:
            services.setdefault(root(run_id), set()).add(service)
    for run_id in parent:
        known = services.get(root(run_id), set())
        if placed[run_id].service is None and len(known) == 1:
            placed[run_id] = Placed(placed[run_id].stage, next(iter(known)))


def run_state(run: TaskRun, *, flow_done: bool = False) -> tuple[str, float | None]:
    """A task run's state as a cell shows it, and its seconds where they mean something."""
    kind, name = run.state_type, run.state_name or ""
    seconds = run.total_run_time.total_seconds()
    if kind == StateType.COMPLETED:
        return ("cached", None) if name == "Cached" else ("passed", seconds)
    if kind in {StateType.FAILED, StateType.CRASHED}:
        return "failed", seconds
    if kind in {StateType.CANCELLED, StateType.CANCELLING}:
        return "cancelled", None
    if kind == StateType.RUNNING:
        return "running", run.estimated_run_time.total_seconds()
    if kind == StateType.PAUSED:
        return "paused", None
    if name in {"AwaitingRetry", "Retrying"}:
        return "retrying", None
    return ("skipped" if flow_done else "waiting"), None


# --- Prefect's console stream -----------------------------------------------------------


class _HoldRunLogs(logging.Filter):
    """Drops flow and task run records and Prefect's chatter below warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            return False
        return not (record.name.startswith("prefect") and record.levelno < logging.WARNING)


@contextlib.contextmanager
def quiet_run_logs() -> Iterator[None]:
    """Hold Prefect's console log stream back (the API handler still sends every record)."""
    handlers = {
        handler
        for logger in (logging.getLogger(), logging.getLogger("prefect"))
        for handler in logger.handlers
        if isinstance(handler, PrefectConsoleHandler)
    }
    hold = _HoldRunLogs()
    for handler in handlers:
        handler.addFilter(hold)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(hold)


# --- following a run -------------------------------------------------------------------


@dataclass
class _Seen:
    """What the last poll found."""

    flow_run: FlowRun | None = None
    runs: list[TaskRun] = field(default_factory=list)
    placed: dict[UUID, Placed] = field(default_factory=dict)
    flow_done: bool = False


class RunProgress:
    """Follows one flow run of this process; see the module's docstring."""

    def __init__(
        self,
        view: StageView,
        console: Console,
        *,
        run_name: str,
        services: Sequence[str],
        run_services: Sequence[str] | None = None,
        poll_s: float = POLL_S,
    ) -> None:
        self.view = view
        self.console = console
        self.run_name = run_name
        self.services = list(services)
        self.run_services = list(run_services) if run_services else None
        self.poll_s = poll_s
        self.live_mode = console.is_interactive and _isatty(console.file)
        self._seen = _Seen()
        self._lock = threading.Lock()
        self._hints: dict[UUID, str] = {}
        self._printed: set[tuple[str, str]] = set()
        self._said: set[str] = set()
        # the approval gate as seen: "" (never paused), paused, checking (an answer came),
        # accepted; and the task runs there were while it waited
        self._gate = ""
        self._before_answer: set[UUID] = set()
        self._exact: dict[tuple[str, str], StageCell] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: Live | None = None

    # the poller

    def __enter__(self) -> RunProgress:
        if self.live_mode:
            self._live = Live(
                console=self.console, get_renderable=self.render, refresh_per_second=4
            )
            self._live.start()
        context = contextvars.copy_context()  # the Prefect settings (API URL) of this thread
        self._thread = threading.Thread(
            target=context.run, args=(self._poll_until_stopped,), daemon=True, name="progress"
        )
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _poll_until_stopped(self) -> None:
        with get_client(sync_client=True) as client:
            while not self._stop.is_set():
                with contextlib.suppress(Exception):  # the API may hiccup; the next poll retries
                    self.poll(client)
                self._stop.wait(self.poll_s)

    def poll(self, client: Any, *, flow_done: bool = False) -> None:
        """Read the run and its task runs once; print what finished since (plain mode)."""
        seen = self._seen
        flow_run = seen.flow_run
        if flow_run is None:
            found = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[self.run_name])),
                limit=1,
            )
            if not found:
                return
            flow_run = found[0]
        else:
            flow_run = client.read_flow_run(flow_run.id)
        runs: list[TaskRun] = []
        while True:
            page = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])),
                sort=TaskRunSort.ID_DESC,  # a stable order for the pages
                limit=PAGE,
                offset=len(runs),
            )
            runs.extend(page)
            if len(page) < PAGE:
                break
        placed = place_runs(
            runs, self.view, self.services, run_services=self.run_services, hints=self._hints
        )
        self._read_hints(client, runs, placed)
        with self._lock:
            self._seen = _Seen(flow_run, runs, placed, flow_done)
        if not self.live_mode:
            self._say_new()

    def _read_hints(self, client: Any, runs: Sequence[TaskRun], placed: dict[UUID, Placed]) -> None:
        """Services of finished, unplaced stages, from the first log line that names one."""
        wanted = [
            r.id
            for r in runs
            if (p := placed.get(r.id)) is not None
            and not p.step
            and p.service is None
            and r.id not in self._hints
            and r.state_type in {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED}
        ]
        if not wanted:
            return
        logs = client.read_logs(
            log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=wanted)), limit=PAGE
        )
        for log in logs:
            if log.task_run_id is not None and log.task_run_id not in self._hints:
                service = named_service(log.message, self.services)
                if service is not None:
                    self._hints[log.task_run_id] = service
        if any(run_id in self._hints for run_id in wanted):
            placed.update(
                place_runs(
                    runs,
                    self.view,
                    self.services,
                    run_services=self.run_services,
                    hints=self._hints,
                )
            )

    # what it shows

    def snapshot(self) -> tuple[list[StageCell], list[StageCell], dict[str, int]]:
        """(stage cells, step cells, unplaced stages counted by stage) of the last poll."""
        with self._lock:
            seen = self._seen
        by_id = {r.id: r for r in seen.runs}
        cells: dict[tuple[str, str], tuple[float, StageCell]] = {}
        steps: dict[str, tuple[float, StageCell]] = {}
        unplaced: dict[str, int] = {}
        for run_id, where in seen.placed.items():
            run = by_id[run_id]
            state, seconds = run_state(run, flow_done=seen.flow_done)
            when = run.expected_start_time.timestamp() if run.expected_start_time else 0.0
            if where.step:
                cell = StageCell("", where.stage, state, seconds)
                if where.stage not in steps or steps[where.stage][0] <= when:
                    steps[where.stage] = (when, cell)
            elif where.stage in self.view.hidden:
                continue
            elif where.service is None:
                unplaced[where.stage] = unplaced.get(where.stage, 0) + 1
            else:
                key = (where.service, where.stage)
                if key not in cells or cells[key][0] <= when:
                    cells[key] = (when, StageCell(where.service, where.stage, state, seconds))
        if self._exact:  # the run's own results: exact, and every stage is in them
            unplaced = {}
            cells.update({key: (0.0, cell) for key, cell in self._exact.items()})
        seen_services = {service for service, _ in cells}
        known = self.run_services or [s for s in self.services if s in seen_services]
        for service in known:  # the run's services in order, with what is still to come
            for stage in self.view.shown:
                cells.setdefault((service, stage), (0.0, StageCell(service, stage, "waiting")))
        order = {s: i for i, s in enumerate(dict.fromkeys([*known, *self.services]))}
        stage_cells = sorted(
            (c for _, c in cells.values()),
            key=lambda c: (order.get(c.service, len(order)), c.service),
        )
        return stage_cells, [c for _, c in sorted(steps.values(), key=lambda x: x[0])], unplaced

    def _end_times(self) -> dict[tuple[str, str], float]:
        """(service or "", stage) -> when its task run ended, to print lines in that order."""
        with self._lock:
            seen = self._seen
        by_id = {r.id: r for r in seen.runs}
        ended = {}
        for run_id, where in seen.placed.items():
            end = by_id[run_id].end_time
            if end is not None and (where.step or where.service is not None):
                ended[(where.service or "", where.stage)] = end.timestamp()
        return ended

    def header(self) -> str:
        """`ci run ci-cli-1a2b: http://ui/runs/flow-run/<id>` once the run exists."""
        flow_run = self._seen.flow_run
        if flow_run is None:
            return f"{self.view.flow} run {self.run_name}: starting"
        url = flow_run_url(str(flow_run.id))
        return f"{self.view.flow} run {self.run_name}: {url or flow_run.id}"

    def paused_line(self) -> str | None:
        """The approval command while the run waits for one."""
        flow_run = self._seen.flow_run
        if flow_run is None or flow_run.state_type != StateType.PAUSED:
            return None
        run_id = flow_run.id
        return (
            f"waiting for approval: cicd approve {run_id} --key KEY"
            f"  (or: cicd reject {run_id} --key KEY --reason ...)"
        )

    def render(self) -> RenderableType:
        """The live view: link, table, steps, unplaced stages, the approval command."""
        cells, steps, unplaced = self.snapshot()
        parts: list[RenderableType] = [Text(self.header(), style="bold")]
        parts.append(stage_table(cells, self.view.shown))
        if steps:
            line = Text("steps: ")
            for i, step in enumerate(steps):
                line.append(", " if i else "")
                line.append(f"{step.stage} ").append_text(cell_text(step.state, step.seconds))
            parts.append(line)
        if unplaced:
            counts = ", ".join(f"{stage} {n}" for stage, n in unplaced.items())
            parts.append(Text(f"not placed yet (the service shows when done): {counts}", "dim"))
        if (paused := self.paused_line()) is not None:
            parts.append(Text(paused, style="magenta"))
        return Group(*parts)

    def _say(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def _say_new(self) -> None:
        """Plain mode: the header once, then one line per stage or step as it finishes."""
        if self._seen.flow_run is not None and "header" not in self._said:
            self._said.add("header")
            self._say(self.header())
        cells, steps, _ = self.snapshot()
        ended = self._end_times()
        done = [c for c in [*steps, *cells] if c.state in FINAL]
        done.sort(key=lambda c: ended.get((c.service, c.stage), float("inf")))
        for cell in done:
            key = (cell.service, cell.stage)
            if key not in self._printed:
                self._printed.add(key)
                self._say(stage_line(cell))
        self._say_gate()

    def _say_gate(self) -> None:
        """Plain mode: the approval gate as the API shows it, claiming nothing it cannot see.

        A paused run that runs again has received *an* answer, not an approval: the gate
        judges it next and pauses again when it refuses it (unsigned, planted, another
        promotion's) or needs another approver. Only a task run the paused run did not have
        shows the gate let the run go on.
        """
        paused = self.paused_line()
        flow_run = self._seen.flow_run
        if paused is not None and self._gate != "paused":
            again = self._gate == "checking"
            self._gate = "paused"
            self._before_answer = {r.id for r in self._seen.runs}
            self._say(
                f"not accepted (refused, or another approver needed); {paused}" if again else paused
            )
        elif (
            self._gate == "paused"
            and flow_run is not None
            and flow_run.state_type == StateType.RUNNING
        ):
            self._gate = "checking"
            self._say("an answer arrived: the gate checks it")
        if self._gate == "checking" and any(
            r.id not in self._before_answer for r in self._seen.runs
        ):
            self._gate = "accepted"
            self._say("approval accepted: the run goes on")

    # the end

    def finish(self, results: Sequence[StageResultLike] = ()) -> None:
        """Poll until the API caught up with the run's end, lay `results` (exact) over the
        polled cells, and print what is left: final lines (plain) and the failures.

        With `results` (every stage, exactly), only the run's own steps still come from the
        API: the polls end as soon as every task run has ended there."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with get_client(sync_client=True) as client:  # task run states arrive as events
            deadline = time.monotonic() + SETTLE_S
            before: object = None
            unchanged = 0
            while time.monotonic() < deadline:
                with contextlib.suppress(Exception):
                    self.poll(client, flow_done=True)
                now = [(r.id, r.state_type) for r in self._seen.runs]
                running = any(r.state_type == StateType.RUNNING for r in self._seen.runs)
                unchanged = unchanged + 1 if now == before and not running else 0
                ended = bool(now) and all(kind in ENDED for _, kind in now)
                if unchanged >= STEADY_POLLS or (results and ended):
                    break
                before = now
                time.sleep(self.poll_s)
        exact = [StageCell(r.service, r.stage, r.status, r.seconds or None) for r in results]
        with self._lock:
            self._exact = {(c.service, c.stage): c for c in exact}
        if self._live is not None:
            self._live.update(self.render(), refresh=True)
            self._live.stop()
            self._live = None
        else:
            self._say_new()
        self._print_failures(results)

    def _print_failures(self, results: Sequence[StageResultLike]) -> None:
        """Each failed stage's summary and the tool's excerpt (a promotion's error says why
        it failed: the command prints it)."""
        for result in results:
            if result.status != "failed":
                continue
            self.console.print(
                Text(f"{result.service} {result.stage} failed: {result.summary}", "bold red"),
                soft_wrap=True,
            )
            if result.excerpt:
                self.console.print(
                    Text("\n".join(f"  {line}" for line in result.excerpt.splitlines())),
                    soft_wrap=True,
                )


def _isatty(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed stream
        return False


def run_flow(
    flow: Flow[..., Any],
    parameters: Mapping[str, Any],
    *,
    view: StageView,
    console: Console,
    services: Sequence[str],
    run_services: Sequence[str] | None = None,
    verbose: bool = False,
    results: Callable[[State[Any]], Sequence[StageResultLike]] | None = None,
) -> State[Any]:
    """Call `flow` in this process and show its progress; its final state.

    Args:
        flow: the flow; called with `parameters` and `return_state=True`.
        parameters: its parameters.
        view: how its task runs show.
        console: where to print (stdout).
        services: every service the configuration knows, in catalog order.
        run_services: the services the run checks, when known in advance.
        verbose: Prefect's log stream instead (as before progress existed).
        results: the run's stage results from its final state (exact, for the end).
    """
    if verbose:
        call: Callable[..., State[Any]] = flow
        return call(**parameters, return_state=True)
    name = f"{view.flow}-cli-{uuid4().hex[:12]}"
    progress = RunProgress(
        view, console, run_name=name, services=services, run_services=run_services
    )
    named: Callable[..., State[Any]] = flow.with_options(flow_run_name=name)
    with quiet_run_logs(), progress:
        state = named(**parameters, return_state=True)
        progress.finish(results(state) if results else ())
    return state

"""Progress of `cicd ci` / `cicd promote` (cicd/progress.py).

For real, through typer's CliRunner (not a terminal: plain lines) on a temporary checkout:
`cicd ci --services auth,course --no-deliver` with and without `--verbose` (two services,
so their unnamed stages must be told apart), `cicd ci --services auth` whose test fails,
and `cicd promote --dry-run`. Prefect's console handler keeps the stream it was
configured with, not the CliRunner's, so `prefect_stream` points it at a buffer to count
the log stream. Then the pure parts (the table renderer, placing task runs, the log
filter) and a promotion followed through its pause against a fake API.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID, uuid4

import pytest
from prefect.client.schemas.objects import (
    FlowRun,
    Log,
    State,
    StateType,
    TaskRun,
    TaskRunResult,
)
from prefect.logging.handlers import PrefectConsoleHandler
from prefect.settings import PREFECT_UI_URL, temporary_settings
from rich.console import Console
from typer.testing import CliRunner

from cicd.cli import app
from cicd.progress import (
    CHECK_STAGES,
    CI_VIEW,
    PROMOTE_VIEW,
    ROLLBACK_VIEW,
    Placed,
    RunProgress,
    StageCell,
    cell_text,
    place_runs,
    quiet_run_logs,
    stage_line,
    stage_table,
)
from tests.tasks.ci_checkout import CONFIG, commit_all, copy_monorepo

_STACK_LINE = re.compile(r"^[a-z][a-z-]*: ")


def _without_stack_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if not _STACK_LINE.match(line)]


SERVICE = "auth"
OTHER = "course"
"""Two services, so that their stages are told apart by more than being the only one."""
UI = "http://prefect-ui.test"
RUN_LINK = re.compile(rf"^ci run ci-cli-[0-9a-f]{{12}}: {UI}/runs/flow-run/[0-9a-f-]{{36}}$")
STEP_LINE = re.compile(r"^(workspace|changes|report) (passed|failed|skipped) \(\d+\.\d+s\)$")
STAGE_LINE = re.compile(r"^(\S+) (\w+) (passed|cached|failed|skipped)( \(\d+\.\d+s\))?$")


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temporary git checkout holding auth, course, the libs and the configuration."""
    return copy_monorepo(tmp_path_factory.mktemp("progress") / "repo", [SERVICE, OTHER])


@pytest.fixture
def prefect_stream() -> Iterator[io.StringIO]:
    """What Prefect's console handler prints during the test."""
    buffer = io.StringIO()
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    assert handlers, "Prefect's console handler is not on the root logger"
    saved = [(h, h.stream, h.console.file) for h in handlers]
    for handler in handlers:
        handler.setStream(buffer)
        handler.console.file = buffer
    yield buffer
    for handler, stream, file in saved:
        handler.setStream(stream)
        handler.console.file = file


def _ci(
    repo: Path, monkeypatch: pytest.MonkeyPatch, services: str, *extra: str
) -> tuple[int, list[str]]:
    monkeypatch.setenv("ELICE_REPO", str(repo))  # the CLI resolves --head there; CI fetches it
    with temporary_settings(updates={PREFECT_UI_URL: UI}):
        result = CliRunner().invoke(app, ["ci", "--services", services, "--no-deliver", *extra])
    return result.exit_code, result.output.splitlines()


@pytest.mark.slow
def test_ci_prints_a_line_per_finished_stage_instead_of_the_log_stream(
    checkout: Path, monkeypatch: pytest.MonkeyPatch, prefect_stream: io.StringIO
) -> None:
    code, lines = _ci(checkout, monkeypatch, f"{SERVICE},{OTHER}")
    print("\n".join(["", "--- plain:", *lines]))
    assert code == 0, "\n".join(lines)
    assert sum(bool(RUN_LINK.match(line)) for line in lines) == 1, lines
    link = next(i for i, line in enumerate(lines) if RUN_LINK.match(line))
    stages = [(m.group(1), m.group(2)) for line in lines if (m := STAGE_LINE.match(line))]
    assert all(i > link for i, line in enumerate(lines) if STAGE_LINE.match(line))
    for service in (SERVICE, OTHER):  # one line per check stage of each service
        assert sorted(stage for svc, stage in stages if svc == service) == sorted(CHECK_STAGES)
    steps = [m.group(1) for line in lines if (m := STEP_LINE.match(line))]
    assert steps[0] == "workspace", lines  # the run's own steps
    assert lines[-1] == "CI passed"
    held = prefect_stream.getvalue().splitlines()
    assert not [line for line in held if "Task run" in line or "Flow run" in line], held

    code, verbose = _ci(checkout, monkeypatch, f"{SERVICE},{OTHER}", "--verbose", "--no-cache")
    assert code == 0, "\n".join(verbose)
    stream = prefect_stream.getvalue().splitlines()[len(held) :]
    assert any("Task run 'run_ruff-" in line for line in stream), stream
    assert any("Finished in state" in line for line in stream), stream
    assert not [line for line in verbose if RUN_LINK.match(line) or STAGE_LINE.match(line)]
    assert verbose[-1] == "CI passed"
    # what both print: the stack's lines, the summary table, the verdict
    # (the stack's own lines, "<part>: ...", depend on what other tests did to the shared
    # stack between the two runs: they are left out of the count)
    progress = len(_without_stack_lines(lines)) - len(_without_stack_lines(verbose))
    assert progress == 1 + len(steps) + len(stages), (lines, verbose)  # the link, then a line each
    assert len(stream) > 2 * progress, (len(stream), progress)
    print(f"progress: {progress} lines; the log stream: {len(stream)} lines")


@pytest.mark.slow
def test_a_failed_stage_prints_its_excerpt_at_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_stream: io.StringIO
) -> None:
    repo = copy_monorepo(tmp_path / "repo", [SERVICE])
    broken = repo / "services" / SERVICE / "tests" / "test_broken.py"
    broken.write_text("def test_broken() -> None:\n    assert 1 + 1 == 3\n")
    commit_all(repo, "break a test")
    code, lines = _ci(repo, monkeypatch, SERVICE)
    text = "\n".join(lines)
    assert code == 1, text
    assert f"{SERVICE} pytest failed" in text
    heading = f"{SERVICE} pytest failed:"
    failure = next(i for i, line in enumerate(lines) if line.startswith(heading))
    excerpt = "\n".join(lines[failure:])
    assert "test_broken" in excerpt
    assert "assert 1 + 1 == 3" in excerpt or "assert 2 == 3" in excerpt
    assert f"CI failed for 1 of 1 services: {SERVICE}: pytest failed" in text
    assert not [line for line in prefect_stream.getvalue().splitlines() if "Task run" in line]


def test_promote_shows_its_link_and_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dry run (no stack): the link, the plan step, then the plan or why there is none."""
    with temporary_settings(updates={PREFECT_UI_URL: UI}):
        result = CliRunner().invoke(app, ["promote", "--to", "staging", "--dry-run"])
    lines = result.output.splitlines()
    assert result.exit_code in {0, 1}, result.output
    assert any(
        re.match(rf"^promote run promote-cli-[0-9a-f]{{12}}: {UI}/runs/flow-run/", line)
        for line in lines
    ), lines
    assert any(re.match(r"^plan (passed|failed) \(", line) for line in lines), lines
    assert len(lines) < 40, lines


# --- the table renderer -----------------------------------------------------------------


def test_stage_table_is_services_by_stages() -> None:
    cells = [
        ("auth", "lock", "passed"),
        ("auth", "ruff", "failed"),
        ("course", "lock", "running"),
        StageCell("course", "ruff", "cached"),
        StageCell("auth", "image", "passed", 12.5),
    ]
    console = Console(record=True, force_terminal=True, width=120)
    console.print(stage_table(cells, CHECK_STAGES, title="ci run x"))
    text = console.export_text(clear=False)
    header = next(line for line in text.splitlines() if "service" in line)
    assert header.split() == ["service", *CHECK_STAGES, "image"]  # given order, then new ones
    rows = {
        line.split()[0]: line
        for line in text.splitlines()
        if line.split() and line.split()[0] in {"auth", "course"}
    }
    assert list(rows) == ["auth", "course"]  # services as first seen
    assert "✓" in rows["auth"]
    assert "✗ failed" in rows["auth"]
    assert "12.5s" in rows["auth"]
    assert "…" in rows["course"]
    assert "cached" in rows["course"]
    assert "ci run x" in text
    styled = console.export_text(styles=True)
    assert "\x1b[1;31m✗ failed" in styled  # failures in bold red


def test_cells_and_lines() -> None:
    assert cell_text("passed", 1.25).plain == "✓ 1.2s"
    assert cell_text("failed", 3.0).plain == "✗ 3.0s"
    assert cell_text("cached").plain == "cached"
    assert cell_text("waiting").plain == "·"
    assert str(cell_text("failed").style) == "bold red"
    assert stage_line(StageCell("auth", "ruff", "passed", 0.14)) == "auth ruff passed (0.1s)"
    assert stage_line(StageCell("auth", "mypy", "cached")) == "auth mypy cached"
    assert stage_line(StageCell("", "workspace", "passed", 2.0)) == "workspace passed (2.0s)"


# --- placing task runs --------------------------------------------------------------------


def _run(
    name: str,
    *,
    after: list[TaskRun] | None = None,
    parent: TaskRun | None = None,
    state: StateType = StateType.COMPLETED,
    message: str | None = None,
    shared: list[TaskRun] | None = None,
) -> TaskRun:
    inputs: dict[str, list[TaskRunResult]] = {}
    if shared:  # Prefect links an input to every task run that was handed the same object
        inputs["catalog"] = [TaskRunResult(id=r.id) for r in shared]
    if after:
        inputs["wait_for"] = [TaskRunResult(id=r.id) for r in after]
    if parent:
        inputs["__parents__"] = [TaskRunResult(id=parent.id)]
    return TaskRun(
        id=uuid4(),
        name=name,
        task_key=name,
        dynamic_key="0",
        task_inputs=inputs,  # type: ignore[arg-type]
        state_type=state,
        state=State(type=state, message=message),
    )


SERVICES = CONFIG.catalog.names()


def test_named_runs_are_placed_by_their_names() -> None:
    runs = [
        _run("publish_image-auth"),
        _run("deploy_service-course-dev"),
        _run("verify_deployment-auth"),
        _run("prepare_workspace-1a2"),
        _run("verify_release_image-auth"),  # a promotion's task, not CI's verify_deployment
    ]
    placed = place_runs(runs, CI_VIEW, SERVICES)
    assert [placed.get(r.id) for r in runs] == [
        Placed("image", "auth"),
        Placed("deploy", "course"),
        Placed("health", "auth"),
        Placed("workspace", None, step=True),
        None,
    ]
    promoted = place_runs(
        [_run("verify_release_image-auth"), _run("deploy_release-auth-staging")],
        PROMOTE_VIEW,
        SERVICES,
    )
    assert sorted(p.stage for p in promoted.values()) == ["deploy", "image"]
    assert {p.service for p in promoted.values()} == {"auth"}
    rolled = place_runs(
        [
            _run("restore_service-auth-staging"),
            _run("recover_interrupted-0a1"),
            _run("finish_rollback-0b2"),
        ],
        ROLLBACK_VIEW,
        SERVICES,
    )
    assert sorted((p.stage, p.service) for p in rolled.values() if not p.step) == [
        ("rollback", "auth"),
    ]
    assert sorted(p.stage for p in rolled.values() if p.step) == ["record", "recover"]


def test_unnamed_runs_take_their_service_from_hints_failures_and_neighbours() -> None:
    lock_a, lock_c = _run("lock_service-0a1"), _run("lock_service-9f3")
    sync_a = _run("sync_service-111", after=[lock_a])
    sync_c = _run("sync_service-222", after=[lock_c])
    ruff_a = _run("run_ruff-abc", after=[sync_a])
    ruff_c = _run(
        "run_ruff-def",
        after=[sync_c],
        state=StateType.FAILED,
        message="Task run encountered an exception CheckFailed: course: ruff failed: E501 x2",
    )
    pytest_a = _run("run_pytest-777", after=[ruff_a], state=StateType.RUNNING)
    nested = _run("build_image-555", parent=pytest_a)
    image_a = _run("build_image-666", after=[pytest_a])
    print_a = _run("fingerprint_service-888", after=[lock_a], shared=[lock_a, lock_c])
    runs = [lock_a, lock_c, sync_a, sync_c, ruff_a, ruff_c, pytest_a, nested, image_a, print_a]

    alone = place_runs(runs, CI_VIEW, SERVICES)  # course from its failure, spread to its lock
    assert alone[lock_c.id] == Placed("lock", "course")
    assert alone[sync_c.id] == Placed("sync", "course")
    assert alone[lock_a.id] == Placed("lock", None)  # nothing names auth yet
    assert nested.id not in alone  # a task run inside another task is no stage

    hinted = place_runs(runs, CI_VIEW, SERVICES, hints={sync_a.id: "auth"})  # auth's log line
    assert {hinted[r.id].service for r in (lock_a, sync_a, ruff_a, pytest_a, image_a)} == {"auth"}
    assert hinted[print_a.id] == Placed("fingerprint", "auth")  # its `catalog` input links no one
    assert hinted[lock_c.id] == Placed("lock", "course")
    assert hinted[image_a.id] == Placed("image", "auth")

    single = place_runs([_run("run_mypy-123")], CI_VIEW, SERVICES, run_services=["auth"])
    assert list(single.values()) == [Placed("mypy", "auth")]


def test_a_run_name_only_names_a_known_service() -> None:
    # `lock-{service}` (a task_run_name to come) must not read Prefect's `lock-service-1a2`
    placed = place_runs([_run("lock_service-1a2")], CI_VIEW, SERVICES)
    assert list(placed.values()) == [Placed("lock", None)]


# --- Prefect's console stream -------------------------------------------------------------


def test_quiet_run_logs_holds_back_run_records_only() -> None:
    handler = PrefectConsoleHandler(stream=io.StringIO())
    root = logging.getLogger()
    root.addHandler(handler)
    try:

        def passes(name: str, level: int) -> bool:
            return bool(handler.filter(logging.LogRecord(name, level, __file__, 1, "x", (), None)))

        with quiet_run_logs():
            assert not passes("prefect.task_runs", logging.ERROR)
            assert not passes("prefect.flow_runs", logging.INFO)
            assert not passes("prefect.engine", logging.INFO)
            assert passes("prefect.client", logging.WARNING)
            assert passes("urllib3", logging.WARNING)
        assert passes("prefect.task_runs", logging.INFO)  # back afterwards
    finally:
        root.removeHandler(handler)


# --- following a run, without a server -----------------------------------------------------


class FakeApi:
    """The four reads RunProgress makes, answering with what a test set."""

    def __init__(self, flow_run: FlowRun) -> None:
        self.flow_run = flow_run
        self.runs: list[TaskRun] = []
        self.logs: list[Log] = []

    def read_flow_runs(self, **_: object) -> list[FlowRun]:
        return [self.flow_run]

    def read_flow_run(self, _: UUID) -> FlowRun:
        return self.flow_run

    def read_task_runs(self, **_: object) -> list[TaskRun]:
        return self.runs

    def read_logs(self, **_: object) -> list[Log]:
        return self.logs


def _log(run: TaskRun, message: str) -> Log:
    return Log(
        name="prefect.task_runs",
        level=20,
        message=message,
        timestamp=datetime.now(UTC),
        task_run_id=run.id,
    )


def test_a_refused_answer_is_never_announced_as_an_approval() -> None:
    """Issue 20: a planted, unsigned answer resumes the run, the gate refuses it and pauses
    again; the display said "approval received: the run goes on" on the resume."""
    flow_run = FlowRun(flow_id=uuid4(), name="promote-cli-y", state_type=StateType.RUNNING)
    api = FakeApi(flow_run)
    out = io.StringIO()
    progress = RunProgress(
        PROMOTE_VIEW, Console(file=out, width=200), run_name="promote-cli-y", services=SERVICES
    )
    api.runs = [_run("plan_promotion-abc")]
    with temporary_settings(updates={PREFECT_UI_URL: UI}):
        progress.poll(api)
        flow_run.state_type = StateType.PAUSED
        progress.poll(api)
        flow_run.state_type = StateType.RUNNING  # the planted answer resumed it
        progress.poll(api)
        progress.poll(api)
        flow_run.state_type = StateType.PAUSED  # the gate refused it and waits again
        progress.poll(api)
    waiting = (
        f"waiting for approval: cicd approve {flow_run.id} --key KEY"
        f"  (or: cicd reject {flow_run.id} --key KEY --reason ...)"
    )
    lines = out.getvalue().splitlines()
    assert lines[-3:] == [
        waiting,
        "an answer arrived: the gate checks it",
        f"not accepted (refused, or another approver needed); {waiting}",
    ]
    assert not any("approval received" in line or "accepted:" in line for line in lines)


def test_a_promotion_is_followed_in_plain_lines_through_its_pause() -> None:
    flow_run = FlowRun(flow_id=uuid4(), name="promote-cli-x", state_type=StateType.RUNNING)
    api = FakeApi(flow_run)
    out = io.StringIO()
    progress = RunProgress(
        PROMOTE_VIEW, Console(file=out, width=200), run_name="promote-cli-x", services=SERVICES
    )
    assert not progress.live_mode  # not a terminal
    smoke = _run("smoke_test_release-123")  # its service: the first line it logged
    api.runs = [_run("plan_promotion-abc"), _run("verify_release_image-auth"), smoke]
    api.logs = [_log(smoke, "auth 0123456789ab is healthy in staging")]
    with temporary_settings(updates={PREFECT_UI_URL: UI}):
        progress.poll(api)
        flow_run.state_type = StateType.PAUSED
        progress.poll(api)
        progress.poll(api)
        flow_run.state_type = StateType.RUNNING
        api.runs.append(_run("deploy_release-auth-staging", state=StateType.RUNNING))
        progress.poll(api)
        console = Console(record=True, force_terminal=True, width=120)
        console.print(progress.render())  # the live view of the same run
    assert out.getvalue().splitlines() == [
        f"promote run promote-cli-x: {UI}/runs/flow-run/{flow_run.id}",
        "plan passed (0.0s)",
        "auth image passed (0.0s)",
        "auth smoke passed (0.0s)",
        (
            f"waiting for approval: cicd approve {flow_run.id} --key KEY"
            f"  (or: cicd reject {flow_run.id} --key KEY --reason ...)"
        ),
        "an answer arrived: the gate checks it",
        "approval accepted: the run goes on",
    ]
    text = console.export_text()
    assert f"promote run promote-cli-x: {UI}/runs/flow-run/{flow_run.id}" in text
    auth = next(line for line in text.splitlines() if line.split()[:1] == ["auth"])
    assert auth.split()[1:] == ["✓", "0.0s", "✓", "0.0s", "…", "0.0s", "·", "·", "·"]
    assert "steps: plan ✓ 0.0s" in text

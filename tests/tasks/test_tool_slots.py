"""Tool slots: how many tools run at once is bounded, not how many tasks wait."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from prefect import flow, task

from flows.ci import POOL_THREADS, bounded_runner
from tasks.process import run_tool, set_tool_slots, tool_slot, tool_slots

SPAN = ["sh", "-c", "date +%s.%N; sleep 0.3; date +%s.%N"]


def spans(results: list[str]) -> list[tuple[float, float]]:
    out = []
    for text in results:
        start, end = (float(line) for line in text.split())
        out.append((start, end))
    return sorted(out)


def overlaps(intervals: list[tuple[float, float]]) -> int:
    """The largest number of intervals open at one moment."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    open_now = most = 0
    for _, step in events:
        open_now += step
        most = max(most, open_now)
    return most


@pytest.fixture(autouse=True)
def restore_slots() -> object:
    before = tool_slots()
    yield
    set_tool_slots(before)


def test_one_slot_runs_tools_one_at_a_time() -> None:
    set_tool_slots(1)
    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = list(pool.map(lambda _: run_tool(SPAN).output, range(4)))
    assert overlaps(spans(runs)) == 1


def test_two_slots_run_two_tools_at_once() -> None:
    set_tool_slots(2)
    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = list(pool.map(lambda _: run_tool(SPAN).output, range(4)))
    assert overlaps(spans(runs)) == 2


def test_a_thread_holding_a_slot_runs_tools_inside_it() -> None:
    set_tool_slots(1)
    done = threading.Event()

    def nested() -> None:
        with tool_slot():
            run_tool(["true"])  # would wait forever if it took a second slot
            done.set()

    worker = threading.Thread(target=nested, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert done.is_set()


def test_bad_slot_count_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        set_tool_slots(0)


@task
def span(i: int) -> str:
    return run_tool([*SPAN, str(i)]).output


@flow
def six_spans() -> list[str]:
    return [f.result() for f in span.map(range(6))]


def test_the_ci_runner_bounds_tools_not_tasks() -> None:
    runs = six_spans.with_options(task_runner=bounded_runner(2))()
    assert overlaps(spans(runs)) == 2
    assert tool_slots() == 2
    assert POOL_THREADS >= 14 * 12  # every stage of 12 services can wait in a thread

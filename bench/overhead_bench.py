"""Orchestration overhead per task run, and peak memory of the pipeline against `make -j2`.

    uv run python bench/overhead_bench.py [N_TASKS] [N_SERVICES]

1. Overhead per task run: the same small piece of work (hashing 64 KiB) done N_TASKS
   times as plain calls, as sequential Prefect task runs in a flow, and as task runs
   submitted to the CI flow's thread pool (`bounded_runner`), against a temporary Prefect
   server. (flow - plain calls) / N_TASKS is what Prefect adds per task run; the flow's
   fixed cost (an empty flow) is printed apart. Three runs each, medians.
2. Peak memory: quality + tests of N_SERVICES services (the `quality_bench` set-up: the
   same git copy, the Makefile generated from the stages' own command builders), the CI
   flow in this process against `make -j2`. A sampler reads /proc every 50 ms and sums
   the resident memory of the process tree: for the flow, this process and its children
   (the Prefect server's process excluded, it is not the pipeline); for make, make's
   tree. It prints the peak of each, the flow's own process at its peak, and the ratio.
   One warm-up of each first. Compare within one run only.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefect import flow, task  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from bench.quality_bench import WORKERS, checkout, makefile, run_flow  # noqa: E402
from blocks.config import load_config  # noqa: E402
from flows.ci import bounded_runner  # noqa: E402

BLOCK = os.urandom(64 * 1024)
PAGE = os.sysconf("SC_PAGE_SIZE")


def work(i: int) -> str:
    return hashlib.sha256(BLOCK + i.to_bytes(4, "big")).hexdigest()


step = task(name="step", persist_result=False)(work)


@flow(name="overhead-empty", persist_result=False)
def empty() -> None:
    """Nothing: the fixed cost of a flow run."""


@flow(name="overhead-sequential", persist_result=False)
def sequential(n: int) -> int:
    return len([step(i) for i in range(n)])


@flow(name="overhead-submitted", persist_result=False)
def submitted(n: int) -> int:
    return len(step.map(range(n)).result())


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def overhead(n: int) -> None:
    variants: dict[str, Callable[[], object]] = {
        "plain calls": lambda: [work(i) for i in range(n)],
        "empty flow": empty,
        "sequential task runs": lambda: sequential(n),
        "submitted task runs": lambda: submitted.with_options(task_runner=bounded_runner(WORKERS))(
            n
        ),
    }
    for call in variants.values():  # warm-up
        call()
    medians = {
        label: statistics.median(timed(call) for _ in range(3)) for label, call in variants.items()
    }
    plain, fixed = medians["plain calls"], medians["empty flow"]
    print(f"\n{n} task runs, {os.cpu_count()} cores (medians of 3)")
    print(f"{'variant':<24} {'wall':>9} {'per task run':>13}")
    for label, seconds in medians.items():
        per = ""
        if label.endswith("task runs"):
            per = f"{(seconds - plain - fixed) / n * 1000:10.1f} ms"
        print(f"{label:<24} {seconds:8.2f}s {per:>13}")
    print("per task run: (flow - empty flow - plain calls) / task runs")


# --- memory -------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


class Sampler:
    """Peak summed RSS of `root`'s process tree (without the `skip` subtrees)."""

    def __init__(self, root: int, skip: set[int]) -> None:
        self._root, self._skip = root, skip
        self.peak = self.peak_root = self.peak_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            tree, todo, total, procs = _children(), [self._root], 0, 0
            while todo:
                pid = todo.pop()
                if pid in self._skip:
                    continue
                total, procs = total + _rss(pid), procs + 1
                todo.extend(tree.get(pid, []))
            if total > self.peak:
                self.peak, self.peak_root = total, _rss(self._root)
            self.peak_procs = max(self.peak_procs, procs)
            self._stop.wait(0.05)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def peak_memory(count: int) -> None:
    cfg = load_config()
    names = cfg.catalog.names()[:count]
    repo = checkout(names)
    make = makefile(repo, cfg.catalog.select(names))
    server = set(_children().get(os.getpid(), []))  # the Prefect server's process
    run_flow(repo, names)  # warm-up: environments, caches
    subprocess.run(["make", "-s", f"-j{WORKERS}", "-f", str(make)], check=True)
    with Sampler(os.getpid(), server) as flow_peak:
        run_flow(repo, names)
    proc = subprocess.Popen(["make", "-s", f"-j{WORKERS}", "-f", str(make)])
    with Sampler(proc.pid, set()) as make_peak:
        proc.wait()
    mib = 1024 * 1024
    print(f"\npeak memory, quality + tests of {len(names)} services, {WORKERS} at a time")
    print(f"{'run':<10} {'tree peak':>10} {'its own process':>16} {'processes':>10}")
    print(
        f"{'flow':<10} {flow_peak.peak / mib:8.0f} MiB {flow_peak.peak_root / mib:13.0f} MiB"
        f" {flow_peak.peak_procs:10d}"
    )
    print(
        f"{'make -j2':<10} {make_peak.peak / mib:8.0f} MiB {make_peak.peak_root / mib:13.0f} MiB"
        f" {make_peak.peak_procs:10d}"
    )
    print(f"flow / make -j2: {flow_peak.peak / max(1, make_peak.peak):.2f}")


def main() -> None:
    n_tasks = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    n_services = int(sys.argv[2]) if len(sys.argv) > 2 else 12
    with prefect_test_harness(server_startup_timeout=180):
        overhead(n_tasks)
        peak_memory(n_services)


if __name__ == "__main__":
    main()

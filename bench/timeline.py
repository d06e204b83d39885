"""Where a bench run's time went: phases from make's recipe timestamps or the flow's task
runs, how much of the run had 0, 1 or 2+ of them open, and CPU by program. A flow task
run is open while it waits for a tool slot too, so for the flow "open" is not "working".

Shared by the benches that compare the flow with a `make -j2` of the same commands.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

# What each make line is, from the command it runs (first match wins), and each flow
# task's phase by task name: the two timelines are compared phase by phase.
MAKE_PHASES = (
    ("/health", "health"),
    ("/containers/", "deploy"),
    ("syft", "sbom"),
    ("/build?", "build"),
    ("/tag?", "build"),
    ("/push?", "push"),
    ("/manifests/", "push"),
    ("pip-audit", "audit"),
    ("pip_audit", "audit"),
    ("pytest", "pytest"),
    ("bandit", "bandit"),
    ("mypy", "mypy"),
    ("ruff", "ruff"),
    (" sync ", "sync"),
    (" lock", "lock"),
    (" export ", "lock"),
)
FLOW_PHASES = {  # task name (the run name's part before the service's name) -> phase
    "lock_service": "lock",
    "sync_service": "sync",
    "fingerprint_service": "fingerprint",
    "run_ruff": "ruff",
    "run_mypy": "mypy",
    "run_bandit": "bandit",
    "run_pytest": "pytest",
    "scan_dependencies": "audit",
    "publish_image": "build+push",
    "generate_sbom": "sbom",
    "deploy_service": "deploy",
    "verify_deployment": "health",
    "record_release": "record",
}


QUIET = ("record", "fingerprint")  # bookkeeping, not tools: left out of "open"


def flow_phase(task_run_name: str) -> str:
    return next(
        (p for prefix, p in FLOW_PHASES.items() if task_run_name.startswith(prefix + "-")),
        "other",
    )


def make_phase(line: str) -> str:
    return next((phase for text, phase in MAKE_PHASES if text in line), "other")


def timed(recipe: str, service: str, log: Path) -> str:
    """A recipe line that appends `service phase start end` (epoch seconds) to `log`."""
    ignore = recipe.startswith("\t-@")
    command = recipe.removeprefix("\t-@" if ignore else "\t@")
    tag = f"{service} {make_phase(command)}"
    return (
        f"\t{'-' if ignore else ''}@s=$$(date +%s.%N); ( {command} ); r=$$?; "
        f'echo "{tag} $$s $$(date +%s.%N)" >> {shlex.quote(str(log))}; exit $$r'
    )


def machine_busy() -> float:
    """CPU seconds this machine has been busy (all cores, every process), from /proc/stat."""
    fields = Path("/proc/stat").read_text(encoding="utf-8").split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds of process `pid` so far (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except FileNotFoundError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            found.extend(int(c) for c in (task / "children").read_text().split())
    return found


def cpu_split(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far: the whole machine, and each named process."""
    return {"machine": machine_busy(), **{name: process_cpu(pid) for name, pid in pids.items()}}


def print_cpu(before: dict[str, float], after: dict[str, float]) -> None:
    used = ", ".join(f"{name} {after[name] - before[name]:.1f}s" for name in before)
    print(f"    CPU during the run: {used}")


@contextlib.contextmanager
def cpu_watch(watched: dict[str, int]) -> Iterator[None]:
    """While the block runs, sample every process's CPU; then print the machine's, each
    watched process's and the top programs' CPU seconds."""
    before, sampler = cpu_split(watched), CpuSampler()
    sampler.start()
    try:
        yield
    finally:
        sampler.stop.set()
        sampler.join()
        print_cpu(before, cpu_split(watched))
        sampler.print_top()


def _label(pid: str) -> str:
    """What a process is, for the CPU table: its program, and a Python's module or script."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    program = Path(args[0].decode(errors="replace")).name or "?"
    if program.startswith("python") and len(args) > 1:
        rest = [a.decode(errors="replace") for a in args[1:3] if a]
        what = rest[1] if rest and rest[0] == "-m" and len(rest) > 1 else rest[0] if rest else ""
        return f"{program} {Path(what).name}"[:40]
    return program[:40]


class CpuSampler(threading.Thread):
    """Every process's CPU seconds by label, sampled every 0.2 s while the run lasts.

    A process that starts and ends between two samples is missed; one that ends after a
    sample loses its last 0.2 s. Good enough to see where the machine's time goes.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.last: dict[str, tuple[str, float]] = {}
        self.used: dict[str, float] = {}

    def _sample(self, *, baseline: bool = False) -> None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                cpu = process_cpu(int(entry.name))
                known = self.last.get(entry.name)
                label, before = known or (_label(entry.name), cpu if baseline else 0.0)
                self.used[label] = self.used.get(label, 0.0) + cpu - before
                self.last[entry.name] = (label, cpu)

    def run(self) -> None:
        self._sample(baseline=True)  # what ran before the run is not counted
        while not self.stop.wait(0.2):
            self._sample()
        self._sample()

    def print_top(self, count: int = 12) -> None:
        top = sorted(self.used.items(), key=lambda kv: -kv[1])[:count]
        print("    CPU by process: " + ", ".join(f"{label} {sec:.1f}s" for label, sec in top))


Span = tuple[str, str, float, float]  # service, phase, start, end (seconds from the run's start)


def make_spans(log: Path, begun: float) -> list[Span]:
    spans = []
    for line in log.read_text(encoding="utf-8").splitlines():
        service, phase, start, end = line.split()
        spans.append((service, phase, float(start) - begun, float(end) - begun))
    return spans


def flow_spans(flow_run_id: Any, begun: float) -> list[Span]:
    """The run's task runs as spans, once the server has them all (they arrive as events)."""
    spans: list[Span] = []
    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            spans = [
                (
                    run.name,
                    flow_phase(run.name),
                    run.start_time.timestamp() - begun,
                    run.end_time.timestamp() - begun,
                )
                for run in runs
                if run.start_time is not None and run.end_time is not None
            ]
            if runs and len(spans) == len(runs):
                break
            time.sleep(1)
    return spans


def report(label: str, spans: list[Span], wall: float) -> None:
    """Per phase: how many, their summed and median seconds, first start, last end; and
    how much of the wall time had 0, 1, 2 or more of them open (see the module's note)."""
    print(f"  {label}: phases (seconds from the start of the run)")
    print(f"    {'phase':<12} {'n':>3} {'sum':>7} {'median':>7} {'first':>7} {'last':>7}")
    phases: dict[str, list[Span]] = {}
    for span in spans:
        phases.setdefault(span[1], []).append(span)
    for phase, group in sorted(phases.items(), key=lambda kv: min(s[2] for s in kv[1])):
        lengths = [end - start for _, _, start, end in group]
        print(
            f"    {phase:<12} {len(group):>3} {sum(lengths):7.1f} {statistics.median(lengths):7.1f}"
            f" {min(s[2] for s in group):7.1f} {max(s[3] for s in group):7.1f}"
        )
    busy = [0.0, 0.0, 0.0]
    step, at = 0.1, 0.0
    work = [(start, end) for _, phase, start, end in spans if phase not in QUIET]
    while at < wall:
        running = sum(1 for start, end in work if start <= at < end)
        busy[min(running, 2)] += step
        at += step
    print(
        f"    open: none {busy[0]:.1f}s, one {busy[1]:.1f}s, two or more {busy[2]:.1f}s"
        f" of {wall:.1f}s"
    )

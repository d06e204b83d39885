"""Quality + tests of N services: the CI flow against a hand-written `make -j2`.

    uv run python bench/quality_bench.py [N] [PAIRS]

The baseline is a Makefile generated from the stages' own command builders
(`lock_commands`, `SYNC_ARGS`, `ruff_commands`, `mypy_command`, `bandit_command`,
`pytest_args`), one target per service running them in the service's directory and
environment, so the two cannot drift apart. The flow is `ci` run in this process
(`--all --no-cache --no-deliver`, checked in place, two workers) against a temporary
Prefect server. Both work on the same temporary git copy of the monorepo: environments
synced and tool caches warm (one warm-up of each first), each keeping its own mypy cache.
Runs alternate (make, flow, flow, make, ...); medians and their ratio are printed,
with the CPU time of each (children included). Compare within one run only.
`BENCH_TIMELINE=1` also prints each flow run's phases (`bench/timeline.py`).
"""

from __future__ import annotations

import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefect.testing.utilities import prefect_test_harness  # noqa: E402

import tasks.forking  # noqa: E402
from bench.ci_bench import _SCRATCH, checkout  # noqa: E402  (the same git copy, env set)
from bench.timeline import flow_spans, report  # noqa: E402
from blocks.catalog import ServiceCatalog, ServiceSpec  # noqa: E402
from blocks.config import load_config  # noqa: E402
from flows.ci import bounded_runner, ci  # noqa: E402
from tasks.process import which  # noqa: E402
from tasks.python_build import SYNC_ARGS, lock_commands  # noqa: E402
from tasks.quality import bandit_command, mypy_command, ruff_commands, shared_config  # noqa: E402
from tasks.source import lib_dependencies, service_env  # noqa: E402
from tasks.testing import pytest_args  # noqa: E402

WORKERS = 2
_FORK_SERVER = tasks.forking.fork_server


def _no_fork_server(
    repo: str | Path,  # noqa: ARG001
    path: Path,  # noqa: ARG001
    env: dict[str, str],  # noqa: ARG001
    module: str = "",  # noqa: ARG001
) -> tasks.forking.ForkServer | None:
    return None


def service_commands(repo: Path, spec: ServiceSpec, libs: list[str]) -> list[list[str]]:
    """The per-service commands of the flow's stages, tools as absolute paths."""
    path = repo / spec.path
    scratch = _SCRATCH / "make" / spec.name
    scratch.mkdir(parents=True, exist_ok=True)
    venv = path / ".venv" / "bin"
    uv = which("uv")
    commands = [[uv, *args] for args in lock_commands(spec, libs)]
    commands.append([uv, *SYNC_ARGS])
    checks = [
        *ruff_commands(scratch / "ruff.json"),
        mypy_command(shared_config(repo, "mypy"), scratch / "mypy-cache"),
        bandit_command(shared_config(repo, "bandit"), scratch / "bandit.json"),
    ]
    commands.extend([str(venv / tool), *args] for tool, *args in checks)
    commands.append(
        [
            str(venv / "python"),
            "-m",
            "pytest",
            *pytest_args(shared_config(repo, "pytest"), spec.package, scratch),
        ]
    )
    return commands


def service_target(repo: Path, spec: ServiceSpec, catalog: ServiceCatalog) -> list[str]:
    """The Makefile target of `spec`: its commands in its directory and environment."""
    path = repo / spec.path
    env = {
        **service_env(path),
        "COVERAGE_FILE": str(_SCRATCH / "make" / spec.name / ".coverage"),
    }
    prefix = f"cd {shlex.quote(str(path))} && env " + " ".join(
        f"{k}={shlex.quote(v)}" for k, v in env.items()
    )
    return [
        f"{spec.name}:",
        *(
            f"\t@{prefix} {shlex.join(command)} > /dev/null"
            for command in service_commands(repo, spec, lib_dependencies(catalog, spec))
        ),
    ]


def makefile(repo: Path, specs: list[ServiceSpec]) -> Path:
    """One target per service: its commands in its directory and environment, in order."""
    catalog = load_config().catalog
    lines = [
        f"all: {' '.join(s.name for s in specs)}",
        ".PHONY: all " + " ".join(s.name for s in specs),
    ]
    for spec in specs:
        lines.extend(service_target(repo, spec, catalog))
    out = _SCRATCH / "Makefile"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_make(make: Path) -> tuple[float, float]:
    cpu, started = _cpu(), time.perf_counter()
    subprocess.run(["make", "-s", f"-j{WORKERS}", "-f", str(make)], check=True)
    return time.perf_counter() - started, _cpu() - cpu


def run_flow(repo: Path, names: list[str], *, fork: bool = True) -> tuple[float, float]:
    """The flow; without `fork`, every service's pytest and bandit is a process of its own."""
    tasks.forking.fork_server = _FORK_SERVER if fork else _no_fork_server
    flow = ci.with_options(task_runner=bounded_runner(WORKERS))
    cpu, started, epoch = _cpu(), time.perf_counter(), time.time()
    state = flow(services=names, repo=str(repo), no_cache=True, return_state=True)
    seconds = time.perf_counter() - started
    if not state.is_completed():
        msg = f"the flow did not pass: {state.message}"
        raise SystemExit(msg)
    if os.environ.get("BENCH_TIMELINE"):  # where the flow's time went, phase by phase
        report("flow", flow_spans(state.state_details.flow_run_id, epoch), seconds)
    return seconds, _cpu() - cpu


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    pairs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    cfg = load_config()
    names = cfg.catalog.names()[:count]
    repo = checkout(names)
    make = makefile(repo, cfg.catalog.select(names))
    print(f"quality + tests of {len(names)} services, {os.cpu_count()} cores, {pairs} pairs")
    variants: dict[str, Callable[[], tuple[float, float]]] = {
        "make -j2": lambda: run_make(make),
        "flow, tool processes": lambda: run_flow(repo, names, fork=False),
        "flow": lambda: run_flow(repo, names),
    }
    walls: dict[str, list[float]] = {label: [] for label in variants}
    cpus: dict[str, list[float]] = {label: [] for label in variants}
    with prefect_test_harness(server_startup_timeout=180):
        for run in variants.values():  # warm-up: environments, uv's cache, mypy caches
            run()
        for pair in range(pairs):
            order = list(variants) if pair % 2 == 0 else list(reversed(variants))
            for label in order:
                wall, cpu = variants[label]()
                walls[label].append(wall)
                cpus[label].append(cpu)
                print(f"  {label:<24} {wall:6.1f} s wall  {cpu:6.1f} s CPU", flush=True)
    base = statistics.median(walls["make -j2"])
    print(f"\n{'variant':<24} {'median wall':>12} {'median CPU':>11} {'vs make -j2':>12}")
    for label in variants:
        wall, cpu = statistics.median(walls[label]), statistics.median(cpus[label])
        print(f"{label:<24} {wall:11.1f}s {cpu:10.1f}s {wall / base:12.2f}")
    shutil.rmtree(_SCRATCH, ignore_errors=True)


if __name__ == "__main__":
    main()

"""A rerun with nothing changed against the first run, the way `cicd ci --all` runs them.

    uv run python bench/rerun_bench.py [N] [RERUNS]

On a temporary git copy of the monorepo (N services, default all; libs, config) that
stands in for the configured repository (ELICE_REPO), in one process against a temporary
Prefect server, with a state dir of its own. Each run is the `ci` flow as `cicd ci --all
--no-deliver` calls it (`cicd.progress.run_flow`, the commit's SHA as `head`): it fetches
the repository into the state dir's mirror, checks the commit out into a fresh worktree
under <state dir>/git/workspaces and removes it afterwards. The first run starts with no
stage cache, no service environment and no tool cache of the pipeline (uv's download
cache stays warm: these machines cannot fetch every wheel again); then RERUNS reruns of
the same commit (default 3). Prints each run, which stages ran and which were found in the
cache, the median rerun and its ratio to the first run (issue 20, item 3: at most 0.05).
Then one service changes (a comment line in its first service's main module) and the
run of that commit shows what the changed service's stages cost, its new environment
(sync) among them. Compare within one run only.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Before Prefect is imported (it reads its settings then): a home and a state dir of its own.
_SCRATCH = Path(tempfile.mkdtemp(prefix="rerun-bench-"))
os.environ["PREFECT_HOME"] = str(_SCRATCH / "prefect-home")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["ELICE_STATE_DIR"] = str(_SCRATCH / "state")

from prefect.client.schemas.objects import State  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402
from rich.console import Console  # noqa: E402

from bench.change_bench import change  # noqa: E402
from bench.ci_bench import _SCRATCH as CI_BENCH_SCRATCH  # noqa: E402
from bench.ci_bench import GIT_ENV, checkout  # noqa: E402
from bench.timeline import cpu_watch, flow_spans, report  # noqa: E402
from blocks.config import load_config  # noqa: E402
from cicd.progress import CI_VIEW, run_flow  # noqa: E402
from core.records import StageResult  # noqa: E402
from flows.ci import ci  # noqa: E402


def results(state: State[Any]) -> list[StageResult]:
    """The run's stage results (as `cicd ci` reads them)."""
    return list(getattr(state.result(raise_on_failure=False), "results", None) or [])


def run_once(
    label: str, head: str, names: list[str], *, phases: bool = False
) -> tuple[float, list[StageResult]]:
    """One `cicd ci --all --no-deliver` of `head`; prints and returns its wall time and
    results (with `phases`, also where it went: task runs by phase, CPU by process)."""
    parameters = {
        "services": None,
        "all_services": True,
        "base": "HEAD~1",
        "head": head,
        "no_cache": False,
        "deliver": False,
        "environment": "dev",
        "config_source": None,
    }
    begun, started = time.time(), time.perf_counter()
    with cpu_watch({"bench": os.getpid()}) if phases else contextlib.nullcontext():
        state = run_flow(
            ci,
            parameters,
            view=CI_VIEW,
            console=Console(file=io.StringIO()),
            services=names,
            run_services=names,
            results=results,
        )
    seconds = time.perf_counter() - started
    found = results(state)
    tally = Counter(f"{r.stage} {r.status}" for r in found)
    print(
        f"  {label:<10} {seconds:7.1f}s  {state.type.value:<9} "
        + ", ".join(f"{k} x{n}" for k, n in sorted(tally.items())),
        flush=True,
    )
    if phases:
        report(label, flow_spans(state.state_details.flow_run_id, begun), seconds)
    return seconds, found


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    reruns = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    names = load_config().catalog.names()[:count]
    repo = checkout(names, _SCRATCH / "repo")
    os.environ["ELICE_REPO"] = str(repo)
    head = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"],
        check=True,
        capture_output=True,
        text=True,
        env=GIT_ENV,
    ).stdout.strip()
    print(f"`cicd ci --all --no-deliver` of {len(names)} services at {head[:12]}, twice and more")
    with prefect_test_harness(server_startup_timeout=300):
        first, _ = run_once("first", head, names, phases=True)
        again = [run_once(f"rerun {n + 1}", head, names, phases=n == 0)[0] for n in range(reruns)]
        # one service changed (a comment line): what its new environment costs in its run
        change(repo, names[0], 1)
        changed_head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            check=True,
            capture_output=True,
            text=True,
            env=GIT_ENV,
        ).stdout.strip()
        changed, found = run_once("changed", changed_head, names)
    median = statistics.median(again)
    print(f"first run {first:.1f}s; rerun median {median:.1f}s; ratio {median / first:.3f}")
    own = {r.stage: r.seconds for r in found if r.service == names[0]}
    print(
        f"one service changed ({names[0]}): run {changed:.1f}s; its stages "
        + ", ".join(f"{stage} {sec:.1f}s" for stage, sec in own.items())
    )
    left = sorted(p.name for p in (_SCRATCH / "state" / "git" / "workspaces").glob("*"))
    print(f"worktrees left behind: {len(left)}")
    for scratch in (_SCRATCH, CI_BENCH_SCRATCH):
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Time one CI run of N services fanned out over 1 worker, then over 2 workers.

    uv run python bench/fanout_bench.py [N]

A temporary Prefect server (`prefect_test_harness`), `cicd setup` on it (the deployments
of prefect.yaml), supervised process workers (`stack.worker.ensure_worker`), and a
temporary git copy of the monorepo saved as the `elice-repository` block. Each worker
takes one run at a time (`--limit 1`), so "1 worker" and "2 workers" mean one and two
service branches at once. Every variant checks the same commit with
`no_cache` (every stage runs); the first variant also warms uv's cache and the base
environments. Prints wall times and the ratio to the 1-worker run; compare within one
run only (this machine's speed drifts between runs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefect.settings import PREFECT_API_URL  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from bench.ci_bench import checkout  # noqa: E402  (the same git copy of the monorepo)
from blocks.config import load_config  # noqa: E402
from core.records import CiOutcome  # noqa: E402
from core.trust import TRUST_FILE_ENV  # noqa: E402
from flows.ci import ci, ci_outcome  # noqa: E402
from reconcile.setup import ensure_setup  # noqa: E402
from stack.worker import ensure_worker, stop_worker  # noqa: E402
from tests.trust import trust_file_for  # noqa: E402


def monorepo(services: list[str]) -> tuple[Path, str]:
    """A bare repository holding `services`, the libs and the shared files; its commit."""
    work = checkout(services, pipeline=True)
    bare = work.parent / "remote.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    head = subprocess.run(
        ["git", "-C", str(work), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    )
    return bare, head.stdout.strip()


def timed(services: list[str], sha: str) -> tuple[float, CiOutcome]:
    started = time.perf_counter()
    state = ci(services=services, head=sha, fan_out=True, no_cache=True, return_state=True)
    seconds = time.perf_counter() - started
    outcome = ci_outcome(state)
    if outcome is None or outcome.failed:
        msg = f"the bench run did not pass: {state.message}"
        raise SystemExit(msg)
    return seconds, outcome


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    services = load_config().catalog.names()[:count]
    bare, sha = monorepo(services)
    scratch = Path(tempfile.mkdtemp(prefix="fanout-bench-"))
    first, second = scratch / "worker-1", scratch / "worker-2"
    with prefect_test_harness(server_startup_timeout=300):
        api = str(PREFECT_API_URL.value())
        try:
            ensure_setup(api)
            os.environ[TRUST_FILE_ENV] = str(trust_file_for(scratch, bare))  # this process
            ensure_worker(first, api, limit=1, repository=str(bare))
            timed(services[:1], sha)  # warm: uv's cache, the tools, the imports
            one, outcome = timed(services, sha)
            ensure_worker(second, api, limit=1, repository=str(bare))
            two, _ = timed(services, sha)
        finally:
            stop_worker(first)
            stop_worker(second)
    print(f"{len(services)} services, {len(outcome.results)} stages, every stage run")
    print(f"1 worker:  {one:6.1f} s  1.00")
    print(f"2 workers: {two:6.1f} s  {two / one:.2f}")


if __name__ == "__main__":
    main()

"""`uv run cicd ci --all` twice, as a user runs it: the first run against a rerun with
nothing changed, delivery included.

    ELICE_STACK_DIR=... uv run python bench/rerun_cli_bench.py [N] [RERUNS]

Each run is the command itself, a process of its own (`uv run cicd ci --all --config CFG
--environment cb-dev`), on a temporary git copy of the monorepo (N services, default all)
that stands in for the configured repository (ELICE_REPO), with a state dir of its own and
a Prefect server of its own (PREFECT_API_URL; its home holds the stage cache). Delivery
goes to the bench environment `cb-dev` (bench/cold_bench.py's) on the local stack that
ELICE_STACK_DIR names (default: this checkout's), started if it is not up: the commit is on
main, so the first run builds, pushes, deploys and health-checks every image; a rerun finds
them. Every service gets a note of its own first, so no image and no stage result of an
earlier run has this content. The bench's containers and images are removed at the end.
Prints the command's own start-up (`uv run cicd --help`), each run's wall time, the median
rerun and its ratio to the first (issue 20, item 3: at most 0.05), and the last lines of
each run's output.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The user's local stack (or the one named): fixed before the bench's own state dir is set.
os.environ.setdefault("ELICE_STACK_DIR", os.environ.get("ELICE_STATE_DIR") or str(ROOT / ".elice"))
_SCRATCH = Path(tempfile.mkdtemp(prefix="rerun-cli-bench-"))
os.environ["ELICE_STATE_DIR"] = str(_SCRATCH / "state")
os.environ["PREFECT_HOME"] = str(_SCRATCH / "prefect-home")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

import docker  # noqa: E402
from prefect import get_client  # noqa: E402
from prefect.client.schemas.sorting import FlowRunSort  # noqa: E402
from prefect.settings import PREFECT_API_URL, temporary_settings  # noqa: E402

from bench.ci_bench import _SCRATCH as CI_BENCH_SCRATCH  # noqa: E402
from bench.ci_bench import GIT_ENV, checkout  # noqa: E402
from bench.cold_bench import ENV, make_cold, write_config  # noqa: E402
from bench.timeline import flow_spans, report  # noqa: E402
from blocks.config import load_config  # noqa: E402
from blocks.registry import OciRegistry  # noqa: E402
from stack.control import ensure_stack  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_prefect(port: int) -> subprocess.Popen[bytes]:
    """A Prefect server of the bench's own on loopback; returns once it answers."""
    log = (_SCRATCH / "prefect-server.log").open("wb")
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    server = subprocess.Popen(
        [*command, "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2):
                return server
        except OSError:
            time.sleep(1)
    server.terminate()
    msg = "the bench's Prefect server did not start (see prefect-server.log)"
    raise SystemExit(msg)


def commit_notes(repo: Path, names: list[str]) -> None:
    """A note of this run in every service: content no earlier run had."""
    marker = uuid.uuid4().hex
    for name in names:
        (repo / "services" / name / "BENCH-NOTE.md").write_text(f"{marker}\n", encoding="utf-8")
    for args in (["add", "-A"], ["commit", "-q", "-m", "bench note"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, env=GIT_ENV)


def flow_report(label: str, api: str, begun: float, wall: float) -> None:
    """Where the run's time went: its flow run against the wall time (the rest is the
    command's start-up, the stack's check and the progress display), and its task runs
    by phase (`bench/timeline.py`)."""
    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
        if not runs or runs[0].start_time is None or runs[0].end_time is None:
            print(f"  {label}: no finished flow run found")
            return
        run = runs[0]
        inside = (run.end_time - run.start_time).total_seconds()
        print(
            f"  {label}: flow run {inside:.1f}s, starting {run.start_time.timestamp() - begun:.1f}s"
            f" after the command; the command ended {begun + wall - run.end_time.timestamp():.1f}s"
            " after the flow run"
        )
        report(label, flow_spans(run.id, begun), wall)


def run_cli(label: str, config: str, env: dict[str, str]) -> float:
    """`uv run cicd ci --all` once; prints its wall time, its last lines and its phases."""
    log = _SCRATCH / f"{label.replace(' ', '-')}.log"
    command = ["uv", "run", "cicd", "ci", "--all", "--config", config, "--environment", ENV]
    begun = time.time()
    started = time.perf_counter()
    with log.open("wb") as out:
        done = subprocess.run(
            command, check=False, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    seconds = time.perf_counter() - started
    tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-3:]
    print(f"  {label:<8} {seconds:7.1f}s  exit {done.returncode}", flush=True)
    for line in tail:
        print(f"      {line[:150]}")
    if done.returncode != 0:
        msg = f"{label} failed: {log}"
        raise SystemExit(msg)
    flow_report(label, env["PREFECT_API_URL"], begun, seconds)
    return seconds


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    reruns = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    names = load_config().catalog.names()[:count]
    stack = ensure_stack()
    client = docker.DockerClient(base_url=stack.docker_host, timeout=600)
    registry = OciRegistry(address=stack.registry, insecure=True)
    config = write_config(names)
    cfg = load_config(config)
    repo = checkout(names, _SCRATCH / "repo")
    commit_notes(repo, names)
    port = free_port()
    server = start_prefect(port)
    env = {
        **os.environ,
        "ELICE_REPO": str(repo),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
    }
    print(f"`uv run cicd ci --all` of {len(names)} services, delivery to {ENV}")
    started = time.perf_counter()
    help_command = ["uv", "run", "cicd", "--help"]
    subprocess.run(help_command, cwd=ROOT, env=env, check=True, capture_output=True)
    print(f"  the command's start-up (`uv run cicd --help`): {time.perf_counter() - started:.1f}s")
    try:
        make_cold(client, cfg, registry)
        first = run_cli("first", config, env)
        again = [run_cli(f"rerun {n + 1}", config, env) for n in range(reruns)]
    finally:
        make_cold(client, cfg, registry)
        client.close()
        server.terminate()
        server.wait(timeout=30)
    median = statistics.median(again)
    print(f"first run {first:.1f}s; rerun median {median:.1f}s; ratio {median / first:.3f}")
    for scratch in (_SCRATCH, CI_BENCH_SCRATCH):
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Time the CI flow over N services: one worker vs one per core, then a cached rerun.

    uv run python bench/ci_bench.py [N]

Runs in one process against a temporary Prefect server, on a temporary git copy of
the monorepo (services, libs, config), so the real checkout is not touched. Every
variant starts from the same warm state (environments synced, tool caches filled)
except the first, which warms them; compare variants within one run only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
_SCRATCH = Path(tempfile.mkdtemp(prefix="ci-bench-"))
os.environ.setdefault("PREFECT_HOME", str(_SCRATCH / "prefect-home"))
os.environ.setdefault("ELICE_STATE_DIR", str(_SCRATCH / "state"))

from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from blocks.config import load_config  # noqa: E402
from flows.ci import bounded_runner, ci  # noqa: E402

IGNORED = shutil.ignore_patterns(
    ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".coverage*"
)


GIT_ENV = {
    "PATH": os.environ["PATH"],
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@example.invalid",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@example.invalid",
}
"""The bench checkouts' git identity (commits must not need a configured user)."""


def checkout(
    services: list[str],
    dest: Path | None = None,
    config: str | None = None,
    *,
    pipeline: bool = False,
) -> Path:
    """A git copy of `services`, the libs, the shared service files and the config (at
    `dest`, default `<scratch>/repo`; `config` replaces config/pipeline.yaml); with
    `pipeline`, prefect.yaml and the flows too (what a worker pinning it compares)."""
    repo = dest or _SCRATCH / "repo"
    for name in services:
        shutil.copytree(ROOT / "services" / name, repo / "services" / name, ignore=IGNORED)
    for shared in (ROOT / "services").iterdir():
        if shared.is_file():
            shutil.copy(shared, repo / "services" / shared.name)
    for part in ("libs", "config", *(("flows",) if pipeline else ())):
        shutil.copytree(ROOT / part, repo / part, ignore=IGNORED)
    if pipeline:
        shutil.copy(ROOT / "prefect.yaml", repo / "prefect.yaml")
    if config is not None:
        shutil.copy(config, repo / "config" / "pipeline.yaml")
    for ignore in (".gitignore", ".dockerignore"):  # the image build context obeys the latter
        shutil.copy(ROOT / ignore, repo / ignore)
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "bench"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, env=GIT_ENV)
    return repo


def timed(label: str, repo: Path, services: list[str], workers: int, no_cache: bool) -> float:
    """Run the flow once; print and return its wall time."""
    flow = ci.with_options(task_runner=bounded_runner(workers))
    started = time.perf_counter()
    state = flow(services=services, repo=str(repo), no_cache=no_cache, return_state=True)
    seconds = time.perf_counter() - started
    first_line = (state.message or "").partition("\n")[0][:60]
    print(f"{label:<34} {seconds:7.1f}s  {state.type.value}: {first_line}")
    return seconds


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    services = load_config().catalog.names()[:count]
    cores = os.cpu_count() or 2
    repo = checkout(services)
    print(f"CI over {len(services)} services ({', '.join(services)}), {cores} cores")
    with prefect_test_harness(server_startup_timeout=180):
        timed("warm-up (sync, caches), uncached", repo, services, cores, no_cache=True)
        base = timed("max_workers=1, uncached", repo, services, 1, no_cache=True)
        rows = [
            (label, timed(label, repo, services, cores, no_cache=cold))
            for label, cold in (
                (f"max_workers={cores}, uncached", True),
                (f"max_workers={cores}, cached", False),
            )
        ]
    print(f"\n{'variant':<34} {'wall':>8} {'vs max_workers=1':>18}")
    print(f"{'max_workers=1, uncached':<34} {base:7.1f}s {1.0:>17.2f}")
    for label, seconds in rows:
        print(f"{label:<34} {seconds:7.1f}s {seconds / base:>17.2f}")
    shutil.rmtree(_SCRATCH, ignore_errors=True)


if __name__ == "__main__":
    main()

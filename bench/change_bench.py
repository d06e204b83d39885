"""One changed service: a push's CI run (change detection) against that service's branch
run alone.

    uv run python bench/change_bench.py [SERVICE] [PAIRS]

On a temporary git copy of the monorepo (all services, libs, config), in one process
against a temporary Prefect server, with caches warm (one full run first). Each run
first commits a change to SERVICE's source (one more comment line: its fingerprint
changes, so every stage of its branch runs again and nothing else changes), then runs
either
- `ci()` with change detection over the last commit, checked in place: what a push runs,
  the other services found unchanged; or
- `ci(services=[SERVICE])`: the branch alone.
Alternated, PAIRS pairs; medians and their ratio (issue 12, item 4: at most 1.5).
Then PAIRS pairs of a push that changes no service (a note outside services and libs)
against a full uncached run of every service (item 3: at most 0.10).
Compare within one run only.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from bench.ci_bench import GIT_ENV, checkout  # noqa: E402  (a git copy in the scratch dir)
from blocks.config import load_config  # noqa: E402
from flows.ci import ci, ci_outcome  # noqa: E402


def change(repo: Path, service: str, n: int) -> None:
    """Commit one more comment line in `service`'s main module."""
    spec = load_config().service(service)
    main = repo / spec.path / "src" / spec.package / "main.py"
    with main.open("a", encoding="utf-8") as out:
        out.write(f"# bench change {n}\n")
    for args in (["add", "-A"], ["commit", "-q", "-m", f"bench change {n}"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, env=GIT_ENV)


def timed(label: str, repo: Path, services: list[str] | None) -> float:
    started = time.perf_counter()
    state = ci(services=services, repo=str(repo), return_state=True)
    seconds = time.perf_counter() - started
    outcome = ci_outcome(state)
    checked = outcome.affected if outcome is not None else "?"
    print(f"  {label:<22} {seconds:6.1f}s  {state.type.value}  checked {checked}")
    return seconds


def main() -> None:
    service = sys.argv[1] if len(sys.argv) > 1 else "auth"
    pairs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    names = load_config().catalog.names()
    repo = checkout(names)
    times: dict[str, list[float]] = {
        "push (detected)": [],
        "branch alone": [],
        "no change": [],
        "full run": [],
    }
    with prefect_test_harness(server_startup_timeout=300):
        ci(all_services=True, repo=str(repo), return_state=True)  # warm every cache
        n = 0
        for _ in range(pairs):
            for label, services in (("push (detected)", None), ("branch alone", [service])):
                n += 1
                change(repo, service, n)
                times[label].append(timed(label, repo, services))
        # issue 12, item 3: a push that changes no service, against the full run
        for _ in range(pairs):
            n += 1
            note = repo / "NOTES.md"  # outside every service and lib
            note.write_text(f"bench note {n}\n", encoding="utf-8")
            for args in (["add", "-A"], ["commit", "-q", "-m", f"bench note {n}"]):
                subprocess.run(["git", "-C", str(repo), *args], check=True, env=GIT_ENV)
            times["no change"].append(timed("no change", repo, None))
            started = time.perf_counter()
            ci(all_services=True, repo=str(repo), no_cache=True, return_state=True)
            times["full run"].append(time.perf_counter() - started)
            print(f"  {'full run':<22} {times['full run'][-1]:6.1f}s")
    alone = statistics.median(times["branch alone"])
    full = statistics.median(times["full run"])
    for label, values in times.items():
        median = statistics.median(values)
        base = full if label in ("no change", "full run") else alone
        print(f"{label:<22} median {median:6.1f}s  ratio {median / base:.2f}")


if __name__ == "__main__":
    main()

"""A read command as a user runs it: `cicd status --json` as a process, against a baseline
process measured in the same run.

    uv run python bench/status_bench.py [RUNS]

The ledger holds 12 services in 3 environments (a temporary state dir, written first);
no Prefect API is configured and no stack record names a server, so the command reads the
ledger alone. Baselines: `git --version` (a process that does nothing) and `cat` of every
ledger file (reading the same records without Python). Alternated, RUNS rounds; medians
and their ratios. Target (issue 20, item 1): `cicd status --json` at most 1 s wall.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blocks.config import load_config  # noqa: E402
from core.records import ImageRef  # noqa: E402
from tasks.releases import Ledger, ReleaseRecord  # noqa: E402
from tests.ledgers import current_ledger  # noqa: E402

CICD = Path(sys.executable).with_name("cicd")


def fill_ledger() -> list[Path]:
    """12 services x 3 environments recorded; the ledger's files."""
    cfg = load_config()
    ledger: Ledger = current_ledger()
    for env in ("dev", "staging", "production"):
        for n, spec in enumerate(cfg.catalog.services):
            image = ImageRef(
                service=spec.name,
                repository=f"127.0.0.1:5000/elice/{spec.name}",
                digest="sha256:" + f"{n:02d}" * 32,
                version="0.1.0-bench",
                commit="b" * 40,
            )
            record = ReleaseRecord(
                service=spec.name, environment=env, image=image, release_id="bench", verified=True
            )
            ledger.record_deploy(env, record)
    state = Path(os.environ["ELICE_STATE_DIR"])
    return sorted(p for p in state.rglob("*.json") if p.is_file())


def timed(args: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{args[0]} failed: {done.stderr.decode()[-500:]}")
    return seconds


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    scratch = Path(tempfile.mkdtemp(prefix="status-bench-"))
    os.environ["ELICE_STATE_DIR"] = str(scratch / "state")
    os.environ["ELICE_STACK_DIR"] = str(scratch / "stack")
    os.environ.pop("PREFECT_API_URL", None)
    files = fill_ledger()
    commands = {
        "cicd status --json": [str(CICD), "status", "--json"],
        "git --version": ["git", "--version"],
        "cat ledger files": ["cat", *map(str, files)],
    }
    timed(commands["cicd status --json"])  # warm the file cache
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, args in commands.items():
            times[name].append(timed(args))
    status = statistics.median(times["cicd status --json"])
    print(f"{len(files)} ledger files, {runs} rounds, medians:")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:20s} {median:7.3f} s   (min {min(values):.3f}, max {max(values):.3f})")
    for name in ("git --version", "cat ledger files"):
        print(f"  ratio status / {name}: {status / statistics.median(times[name]):.0f}x")
    print(f"  target: at most 1 s wall -> {'met' if status <= 1.0 else 'missed'} ({status:.2f} s)")


if __name__ == "__main__":
    main()

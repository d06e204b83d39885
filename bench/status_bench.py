"""A read command as a user runs it: `cicd status --json` as a process, against a baseline
process measured in the same run.

    uv run python bench/status_bench.py [RUNS]

The ledger holds 12 services in 3 environments (a temporary state dir, written first);
no Prefect API is configured and no stack record names a server, so the command reads the
ledger alone. Then the same with the stack's server running (a real `prefect server start`
behind an auth string, named by a stack record of its own, a saved `elice-docker` block):
the command asks it for the docker target's block with the stack's string, as a user's
does. Baselines: `git --version` (a process that does nothing) and `cat` of every ledger
file (reading the same records without Python). Alternated, RUNS rounds; medians and
their ratios. Target (issue 20, item 1): `cicd status --json` at most 1 s wall.
"""

from __future__ import annotations

import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefect.settings import (  # noqa: E402
    PREFECT_API_AUTH_STRING,
    PREFECT_API_URL,
    temporary_settings,
)

from blocks.config import load_config  # noqa: E402
from blocks.docker_target import DockerTarget  # noqa: E402
from blocks.stack import StackInfo, save_stack_info, stack_auth_file  # noqa: E402
from core.catalog import DOCKER_TARGET_BLOCK  # noqa: E402
from core.records import ImageRef  # noqa: E402
from tasks.releases import Ledger, ReleaseRecord  # noqa: E402
from tests.ledgers import current_ledger  # noqa: E402
from tests.prefect_server import served_prefect  # noqa: E402

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


def timed(args: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, check=False, env=env)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{args[0]} failed: {done.stderr.decode()[-500:]}")
    return seconds


def served_stack(root: Path, url: str, auth: str) -> dict[str, str]:
    """A stack record naming the server at `url` and its auth string, with a saved docker
    target; the environment of a user of that stack."""
    root.mkdir(parents=True)
    info = StackInfo(
        docker_host="unix:///nonexistent.sock",
        registry="127.0.0.1:5000",
        base_image="localhost/python-base:3.11",
        prefect_api_url=url,
    )
    save_stack_info(info, root)
    stack_auth_file(root).write_text(auth)
    stack_auth_file(root).chmod(0o600)
    with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_API_AUTH_STRING: auth}):
        DockerTarget().save(DOCKER_TARGET_BLOCK, overwrite=True)
    return {**os.environ, "ELICE_STACK_DIR": str(root)}


def measure(commands: dict[str, list[str]], envs: dict[str, dict[str, str]], runs: int) -> None:
    """Alternated rounds of `commands`; medians, ratios, the target."""
    for name, args in commands.items():
        timed(args, envs.get(name))  # warm the file cache
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, args in commands.items():
            times[name].append(timed(args, envs.get(name)))
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:34s} {median:7.3f} s   (min {min(values):.3f}, max {max(values):.3f})")
    for status_name in (n for n in commands if n.startswith("cicd")):
        status = statistics.median(times[status_name])
        for name in ("git --version", "cat ledger files"):
            ratio = status / statistics.median(times[name])
            print(f"  ratio {status_name} / {name}: {ratio:.0f}x")
        verdict = "met" if status <= 1.0 else "missed"
        print(f"  target ({status_name}): at most 1 s wall -> {verdict} ({status:.2f} s)")


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
    print(f"{len(files)} ledger files, {runs} rounds, medians:")
    measure(commands, {}, runs)
    auth = "admin:" + secrets.token_urlsafe(32)
    with served_prefect(scratch / "prefect-home", auth=auth) as url:
        served = served_stack(scratch / "stack-served", url, auth)
        with_server = {"cicd status --json (stack's server)": commands["cicd status --json"]}
        print(f"with the stack's server running ({url}), {runs} rounds, medians:")
        measure({**with_server, **commands}, dict.fromkeys(with_server, served), runs)


if __name__ == "__main__":
    main()

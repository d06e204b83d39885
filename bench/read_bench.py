"""The other read commands as a user runs them: `cicd health`, `cicd metrics` and
`cicd stack status` as processes, against the baselines of `bench/status_bench.py` in
the same run.

    uv run python bench/read_bench.py [RUNS] [ROW ...]

ROW: only the commands whose name contains it (`"stack status"`); the baselines always run.

The ledger holds 12 services in 3 environments (as in status_bench.py). With the stack's
server running (a real `prefect server start` behind an auth string, a saved
`elice-docker` block), each command runs as a user of that stack does:
- `cicd metrics --json` over that ledger (commit times from this checkout's git);
- `cicd health production --json` of a configuration whose one service (`probe`, the
  real servicekit app) serves production on a free loopback port, its release recorded
  in a ledger of its own;
- `cicd stack status` of the stack named by BENCH_STACK_DIR (default: the test suite's,
  /var/tmp/elice-test-stack, whose engine and registry run: run the bench under
  `flock /tmp/elice-stack.lock`), its engine asked for the base image.
Before the light path, `cicd health` also ensured the stack (`use_stack`): its engine and
registry were reused there, and it ran the health-check flow against the server.
Target (issue 20, item 1): each at most 1 s wall.
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.status_bench import CICD, fill_ledger, measure, served_stack  # noqa: E402
from core.records import ImageRef  # noqa: E402
from tasks.releases import ReleaseRecord  # noqa: E402
from tests.ledgers import current_ledger  # noqa: E402
from tests.prefect_server import served_prefect  # noqa: E402
from tests.tasks.servicekit_server import DIGEST_A, servicekit_server  # noqa: E402


def health_setup(scratch: Path, url: str) -> tuple[Path, Path]:
    """A configuration whose `probe` serves production at `url`, and a state dir whose
    ledger records it on DIGEST_A."""
    port = int(url.rsplit(":", 1)[1])
    base = max(1024, port - 40000)
    env = {
        "name": "production",
        "namespace": "bench-production",
        "replicas": {"min": 1, "max": 1},
        "log_level": "INFO",
        "storage": "minio",
        "local_port_offset": port - base,
    }
    config = scratch / "health.yaml"
    config.write_text(
        yaml.safe_dump({"services": [{"name": "probe", "port": base}], "environments": [env]}),
        encoding="utf-8",
    )
    state = scratch / "health-state"
    previous = os.environ["ELICE_STATE_DIR"]
    os.environ["ELICE_STATE_DIR"] = str(state)
    try:
        image = ImageRef(service="probe", repository="127.0.0.1:5000/elice/probe", digest=DIGEST_A)
        record = ReleaseRecord(
            service="probe", environment="production", image=image, release_id="bench"
        )
        current_ledger().record_deploy("production", record)
    finally:
        os.environ["ELICE_STATE_DIR"] = previous
    return config, state


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    scratch = Path(tempfile.mkdtemp(prefix="read-bench-"))
    os.environ["ELICE_STATE_DIR"] = str(scratch / "state")
    os.environ["ELICE_STACK_DIR"] = str(scratch / "stack")
    os.environ.pop("PREFECT_API_URL", None)
    files = fill_ledger()
    auth = "admin:" + secrets.token_urlsafe(32)
    stack_dir = os.environ.get("BENCH_STACK_DIR", "/var/tmp/elice-test-stack")
    with (
        served_prefect(scratch / "prefect-home", auth=auth) as url,
        servicekit_server(scratch / "probe", {"ENVIRONMENT": "production"}) as probe,
    ):
        served = served_stack(scratch / "stack-served", url, auth)
        config, state = health_setup(scratch, probe)
        # the user's shell of a running stack: its server and auth string configured
        user = {**served, "PREFECT_API_URL": url, "PREFECT_API_AUTH_STRING": auth}
        commands = {
            "cicd health production --json": [
                str(CICD),
                "health",
                "production",
                "--json",
                "--config",
                str(config),
            ],
            "cicd metrics --json": [str(CICD), "metrics", "--json"],
            "cicd stack status": [str(CICD), "stack", "status"],
            "git --version": ["git", "--version"],
            "cat ledger files": ["cat", *map(str, files)],
        }
        if rows := sys.argv[2:]:
            commands = {
                name: args
                for name, args in commands.items()
                if not name.startswith("cicd") or any(row in name for row in rows)
            }
        envs = {
            "cicd health production --json": {
                **user,
                "ELICE_STATE_DIR": str(state),
                "ELICE_STACK_DIR": stack_dir,
            },
            "cicd metrics --json": user,
            "cicd stack status": {**user, "ELICE_STACK_DIR": stack_dir, "COLUMNS": "200"},
        }
        print(f"{len(files)} ledger files, stack {stack_dir}, server {url}, {runs} rounds:")
        measure(commands, envs, runs)


if __name__ == "__main__":
    main()

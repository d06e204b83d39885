"""The read commands as a user runs them: the installed console script in a user's shell,
and the modules its light path loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CICD = Path(sys.executable).with_name("cicd")
HEAVY = ("prefect", "prefect_aws", "prefect_kubernetes", "kubernetes_asyncio", "boto3", "docker")


def user_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A user's shell: no Prefect API, this test's state dir (ELICE_STATE_DIR as set),
    no stack record unless `extra` names one; `extra` added last."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        ELICE_STATE_DIR=os.environ["ELICE_STATE_DIR"],
        ELICE_STACK_DIR=str(tmp_path / "stack"),
        ELICE_CONFIG="",
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        COLUMNS="200",  # the table's cells unfolded
        **extra,
    )
    return env


def run_cicd(
    env: dict[str, str], *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`cicd ARGS` as the installed console script (in `cwd` if given)."""
    return subprocess.run(
        [str(CICD), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def probe_cicd(
    env: dict[str, str], *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the console script's entry on `cicd ARGS` in a process that then names the heavy
    modules (`HEAVY`: Prefect, its integrations, boto3, docker) it loaded on a stderr line
    (`heavy_of` reads it) and exits with the entry's code."""
    probe = (
        "import sys, json\n"
        f"sys.argv = ['cicd', *{list(args)!r}]\n"
        "from cicd.entry import main\n"
        "code = 0\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code or 0\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "print('HEAVY ' + json.dumps(heavy), file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", probe],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def heavy_of(done: subprocess.CompletedProcess[str]) -> list[str]:
    """The heavy modules a `probe_cicd` process named."""
    line = next((x for x in done.stderr.splitlines() if x.startswith("HEAVY ")), None)
    assert line is not None, done.stderr
    return list(json.loads(line.removeprefix("HEAVY ")))


def heavy_modules(env: dict[str, str], *args: str) -> tuple[int, str, list[str]]:
    """`probe_cicd` on `cicd ARGS`: (exit code, stdout, the heavy modules it loaded)."""
    done = probe_cicd(env, *args)
    return done.returncode, done.stdout, heavy_of(done)

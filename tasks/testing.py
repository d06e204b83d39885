"""pytest with coverage for one service, in the service's own environment.

Most of a service's pytest run is start-up: the interpreter, pytest and its plugins,
coverage, fastapi and pydantic take about 1.5 s to import, the tests a fraction of that.
So a CI run that tests several services of one checkout starts a fork server
(tasks/forkserver.py) in the first service's environment, which imports those once; each
later service's `python -m pytest` runs in a fork of it, in that service's own directory,
variables and site-packages, provided its environment has every pre-imported distribution
at the same version on the same interpreter. Otherwise (or while the server is still
starting, or if it fails) the service runs as its own process, as before. Either way one
service's run is one process of its own: its outcome, output and coverage are its own.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import task

from blocks.catalog import ServiceSpec
from tasks.exceptions import ToolError
from tasks.models import StageResult
from tasks.process import STAGE_RETRY_OPTIONS, ToolRun, run_logger, run_tool, tool_slot
from tasks.quality import failed_check, passed_result, shared_config, venv_tool
from tasks.source import (
    Details,
    scratch_dir,
    service_dir,
    service_env,
    stage_cache_key,
)

PYTEST_TIMEOUT_S = 900
_OUTCOME = re.compile(r"^(?:=+ )?(\d+ \w+(?:, \d+ \w+)*) in [\d.]+s", re.M)
# pytest's exit codes: 1 tests failed, 2 interrupted (e.g. collection errors), 5 no tests.
FAILED_EXITS = {1: "tests failed", 2: "test collection failed", 5: "no tests were collected"}


FORK_SERVER = Path(__file__).with_name("forkserver.py")
FORK_PRELOAD = (
    "pytest",
    "_pytest.python",
    "_pytest.fixtures",
    "_pytest.terminal",
    "_pytest.assertion.rewrite",
    "pytest_cov.plugin",
    "coverage",
    "coverage.control",
    "anyio",
    "anyio.pytest_plugin",
    "pydantic",
    "fastapi",
    "fastapi.testclient",
    "starlette.testclient",
    "httpx",
    "prometheus_client",
)
"""Third-party modules every service's tests import (never a service's or a lib's own)."""
FORK_ONLY_WARNING = (
    "ignore:Module already imported so cannot be rewritten:pytest.PytestAssertRewriteWarning"
)
"""Forked runs only: plugins the server imported (anyio's) cannot have their asserts rewritten."""
FORK_IDLE_S = 120.0
"""A fork server nobody used for this long exits by itself."""


def site_packages(venv: Path) -> Path | None:
    """The environment's site-packages directory, if it has exactly one."""
    found = sorted(venv.glob("lib/python3*/site-packages"))
    return found[0] if len(found) == 1 else None


def _normalize(name: str) -> str:
    return "-".join(name.lower().replace("_", "-").replace(".", "-").split("-"))


def installed_distributions(site: Path) -> dict[str, str]:
    """name -> version of every distribution installed in `site` (from its dist-info names)."""
    found: dict[str, str] = {}
    for info in site.glob("*.dist-info"):
        name, _, version = info.name.removesuffix(".dist-info").partition("-")
        found[_normalize(name)] = version
    return found


@dataclass
class ForkServer:
    """One running tasks/forkserver.py, started in one service environment of a checkout."""

    venv: Path
    socket_path: Path
    process: subprocess.Popen[bytes]
    info: dict[str, Any] = field(default_factory=dict)

    def ready(self) -> bool:
        """True once the server has imported everything and listens; False while it starts."""
        if self.info:
            return True
        announced = Path(f"{self.socket_path}.json")
        if self.process.poll() is not None or not announced.is_file():
            return False
        self.info = json.loads(announced.read_text(encoding="utf-8"))
        return True

    def alive(self) -> bool:
        """The process runs and its environment still exists."""
        return self.process.poll() is None and self.venv.is_dir()

    def serves(self, venv: Path) -> str:
        """ "" when `venv` can use this server, else why not."""
        if (venv / "bin" / "python").resolve() != (self.venv / "bin" / "python").resolve():
            return "another interpreter"
        site = site_packages(venv)
        if site is None:
            return "no site-packages"
        installed = installed_distributions(site)
        for name, version in self.info.get("distributions", {}).items():
            if installed.get(name) != version:
                return f"{name} {installed.get(name, 'missing')} (server: {version})"
        return ""

    def run(
        self, module: str, args: list[str], cwd: Path, env: dict[str, str], timeout: float
    ) -> ToolRun:
        """`python -m module args` of the environment `cwd/.venv`, in a fork of the server.

        Raises:
            ToolError: the run timed out (its process group is killed).
            OSError: the server could not take the request (the caller runs it itself).
        """
        site = site_packages(cwd / ".venv")
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="pyfork-run-") as scratch:
            output = Path(scratch) / "output"
            request = {
                "module": module,
                "args": args,
                "cwd": str(cwd),
                "env": env,
                "site": str(site),
                "prefix": str(cwd / ".venv"),
                "output": str(output),
            }
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(30)
                conn.connect(str(self.socket_path))
                stream = conn.makefile("rw", encoding="utf-8")
                stream.write(json.dumps(request) + "\n")
                stream.flush()
                started_child = json.loads(stream.readline())
                conn.settimeout(timeout)
                try:
                    line = stream.readline()
                except TimeoutError as exc:
                    with contextlib.suppress(OSError):
                        os.killpg(int(started_child["pgid"]), signal.SIGKILL)
                    msg = f"python -m {module} timed out after {timeout:.0f}s"
                    raise ToolError(msg) from exc
            if not line:
                msg = f"the fork server dropped the run of {module} in {cwd}"
                raise OSError(msg)
            returncode = int(json.loads(line)["returncode"])
            text = output.read_text(encoding="utf-8", errors="replace") if output.exists() else ""
        args_run = (str(cwd / ".venv" / "bin" / "python"), "-m", module, *args)
        return ToolRun(args_run, returncode, text, time.monotonic() - started)

    def stop(self) -> None:
        """Terminate the server and remove its socket directory."""
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.socket_path.parent, ignore_errors=True)


_SERVERS: dict[str, list[ForkServer]] = {}
_SERVERS_LOCK = threading.Lock()


def _start_server(venv: Path, env: dict[str, str]) -> ForkServer:
    directory = Path(tempfile.mkdtemp(prefix="pyfork-"))  # short: socket paths are limited
    path = directory / "server.sock"
    process = subprocess.Popen(
        [
            str(venv / "bin" / "python"),
            str(FORK_SERVER),
            str(path),
            str(FORK_IDLE_S),
            ",".join(FORK_PRELOAD),
        ],
        cwd=venv.parent,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return ForkServer(venv=venv, socket_path=path, process=process)


def fork_server(repo: str | Path, path: Path, env: dict[str, str]) -> ForkServer | None:
    """A ready fork server of the checkout `repo` that can run the service at `path`.

    The first request of a checkout starts one in that service's environment and gets None
    (it runs on its own meanwhile), as does any request while the server starts or when
    no server serves the environment (logged).
    """
    venv = path / ".venv"
    key = str(Path(repo).resolve())
    with _SERVERS_LOCK:
        servers = [s for s in _SERVERS.get(key, []) if s.alive()]
        _SERVERS[key] = servers
        if not servers:
            servers.append(_start_server(venv, env))
            return None
        reasons = []
        for server in servers:
            if not server.ready():
                reasons.append("starting")
                continue
            reason = server.serves(venv)
            if not reason:
                return server
            reasons.append(reason)
    run_logger().info("%s: pytest runs on its own (fork server: %s)", path.name, "; ".join(reasons))
    return None


def stop_fork_servers(repo: str | Path | None = None) -> None:
    """Stop the fork servers of the checkout `repo` (default: every one this process started)."""
    with _SERVERS_LOCK:
        keys = list(_SERVERS) if repo is None else [str(Path(repo).resolve())]
        stopping = [s for k in keys for s in _SERVERS.pop(k, [])]
    for server in stopping:
        server.stop()


atexit.register(stop_fork_servers)


def run_pytest_process(
    repo: str | Path, path: Path, args: list[str], env: dict[str, str], timeout: float
) -> ToolRun:
    """`python -m pytest args` in the service's environment: in a fork server when one
    serves it, else as a process of its own.

    Raises:
        ToolError: pytest could not be started or timed out.
    """
    full_env = {**os.environ, **env}
    server = fork_server(repo, path, full_env)
    with tool_slot():  # the fork works like a tool process: one slot
        if server is not None:
            try:
                return server.run(
                    "pytest", [*args, "-W", FORK_ONLY_WARNING], path, full_env, timeout
                )
            except OSError as exc:
                run_logger().warning(
                    "%s: fork server failed (%s); running pytest itself", path.name, exc
                )
        return run_tool(
            [venv_tool(path, "python"), "-m", "pytest", *args], cwd=path, env=env, timeout=timeout
        )


def pytest_args(config: str, package: str, scratch: Path) -> list[str]:
    """The arguments of one service's `python -m pytest` (reports written under `scratch`)."""
    return [
        "-q",
        "-c",
        config,
        "-p",
        "no:cacheprovider",
        f"--cov={package}",
        "--cov-report=",
        f"--cov-report=json:{scratch / 'coverage.json'}",
        f"--cov-report=xml:{scratch / 'coverage.xml'}",
    ]


def pytest_outcome(output: str) -> str:
    """pytest's final tally (`1 failed, 3 passed`), or "" when it printed none."""
    found = _OUTCOME.findall(output)
    return found[-1] if found else ""


def total_coverage(report: Path) -> float:
    """The total line (and branch) coverage percentage of a coverage.py JSON report.

    Raises:
        ToolError: the report is missing or not coverage.py's JSON.
    """
    try:
        data = json.loads(report.read_text(encoding="utf-8"))
        return float(data["totals"]["percent_covered"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        msg = f"no usable coverage report at {report}: {exc}"
        raise ToolError(msg) from exc


@task(
    name="run-pytest",
    task_run_name="pytest-{service.name}",
    cache_key_fn=stage_cache_key,
    **STAGE_RETRY_OPTIONS,
)
def run_pytest(
    service: ServiceSpec, repo: str, threshold: int, fingerprint: str = ""
) -> StageResult:
    """Run the service's tests with coverage of its package; check the coverage floor.

    pytest and pytest-cov read the services' shared services/pytest.ini (so the rootdir
    is services/); the package measured is the service's.

    Coverage data goes to a per-run COVERAGE_FILE (concurrent services never share
    `.coverage`); the JSON and XML reports are kept under the state dir.

    Raises:
        CheckFailed: failing tests, collection errors, or coverage below `threshold`.
        ToolError: pytest could not run.
    """
    path = service_dir(repo, service)
    reports = scratch_dir(repo, service.name, "coverage")
    config = shared_config(repo, "pytest")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"pytest-{service.name}-") as scratch:
        json_report = Path(scratch) / "coverage.json"
        xml_report = Path(scratch) / "coverage.xml"
        ran = run_pytest_process(
            repo,
            path,
            pytest_args(config, service.package, Path(scratch)),
            {**service_env(path), "COVERAGE_FILE": str(Path(scratch) / ".coverage")},
            PYTEST_TIMEOUT_S,
        )
        outcome = pytest_outcome(ran.output) or f"pytest exited {ran.returncode}"
        if ran.returncode in FAILED_EXITS:
            summary = f"{FAILED_EXITS[ran.returncode]}: {outcome}"
            raise failed_check(service.name, "pytest", started, summary, ran.excerpt())
        if not ran.ok:
            msg = f"{service.name}: pytest exited {ran.returncode}: {ran.excerpt(10)}"
            raise ToolError(msg)
        coverage = round(total_coverage(json_report), 2)
        for report in (json_report, xml_report):
            if report.is_file():
                shutil.copy(report, reports / report.name)
    details: Details = {"coverage": coverage, "threshold": threshold}
    if coverage < threshold:
        summary = f"coverage {coverage:.1f}% is below the {threshold}% threshold ({outcome})"
        raise failed_check(service.name, "pytest", started, summary, ran.excerpt(), details)
    result = passed_result(
        service.name, "pytest", started, f"{outcome}; coverage {coverage:.1f}%", fingerprint
    )
    return result.model_copy(
        update={
            "details": {
                **result.details,
                **details,
                "coverage_xml": str(reports / "coverage.xml"),
            }
        }
    )

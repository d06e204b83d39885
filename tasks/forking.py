"""Python tools run in a service's own environment: in a fork of a pre-imported server
when one serves that environment, else as a process of their own.

Most of a short tool run is start-up: the interpreter, pytest and its plugins, coverage,
fastapi and pydantic take about 1.5 s to import, bandit and its plugins 0.26 s, the work a
fraction of that. So a CI run of several services of one checkout starts a fork server
(tasks/forkserver.py) in the first service's environment, which imports those once; each
later `python -m pytest` or `python -m bandit` of a service runs in a fork of it, in that
service's own directory, variables and site-packages, provided its environment has every
pre-imported distribution at the same version on the same interpreter. Otherwise (or
while the server is still starting, or if it fails) the tool runs as its own process, as
before. Either way one service's run is one process of its own: its outcome, output and
reports are its own.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import ToolError
from tasks.process import (
    ToolRun,
    env_secrets,
    run_logger,
    run_tool,
    tool_env,
    tool_output,
    tool_slot,
)
from tasks.source import service_env


def venv_tool(path: Path, tool: str) -> str:
    """The service's own copy of `tool`.

    Raises:
        ToolError: the service's environment lacks it (sync the service first).
    """
    found = path / ".venv" / "bin" / tool
    if not found.exists():
        msg = f"{found} does not exist: sync the service's environment (uv sync) first"
        raise ToolError(msg)
    return str(found)


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
    "bandit.cli.main",
    "bandit.core.manager",
    "bandit.core.extension_loader",
)
"""Third-party modules every service's tests and the bandit stage import (never a service's
or a lib's own); only distributions every service environment has at one version, or the
server serves none of those that lack one."""
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
            raw = output.read_bytes() if output.exists() else b""
            text = tool_output(raw, secrets=env_secrets(env))
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


def _servers(key: str, venv: Path, env: dict[str, str]) -> tuple[list[ForkServer], bool]:
    """The live fork servers of the checkout `key`, one started in `venv` if none was; and
    whether it was started now. Call with `_SERVERS_LOCK` held."""
    servers = [s for s in _SERVERS.get(key, []) if s.alive()]
    started = not servers
    if started:
        servers.append(_start_server(venv, env))
    _SERVERS[key] = servers
    return servers, started


def warm_fork_server(repo: str | Path, path: Path) -> None:
    """Start the checkout's fork server in the environment at `path` if none runs yet, so
    it has imported its modules by the time the first tool asks for it."""
    with _SERVERS_LOCK:
        _servers(str(Path(repo).resolve()), path / ".venv", tool_env(service_env(path)))


def fork_server(
    repo: str | Path, path: Path, env: dict[str, str], module: str = "pytest"
) -> ForkServer | None:
    """A ready fork server of the checkout `repo` that can run the service at `path`.

    The first request of a checkout starts one in that service's environment and gets None
    (it runs on its own meanwhile), as does any request while the server starts or when
    no server serves the environment (logged).
    """
    venv = path / ".venv"
    with _SERVERS_LOCK:
        servers, started = _servers(str(Path(repo).resolve()), venv, env)
        if started:
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
    run_logger().info(
        "%s: %s runs on its own (fork server: %s)", path.name, module, "; ".join(reasons)
    )
    return None


def stop_fork_servers(repo: str | Path | None = None) -> None:
    """Stop the fork servers of the checkout `repo` (default: every one this process started)."""
    with _SERVERS_LOCK:
        keys = list(_SERVERS) if repo is None else [str(Path(repo).resolve())]
        stopping = [s for k in keys for s in _SERVERS.pop(k, [])]
    for server in stopping:
        server.stop()


atexit.register(stop_fork_servers)


def run_module(
    repo: str | Path,
    path: Path,
    module: str,
    args: Sequence[str],
    env: dict[str, str],
    timeout: float,
    *,
    fork_args: Sequence[str] = (),
) -> ToolRun:
    """`python -m module args` in the environment of the service at `path`: in a fork
    server of the checkout `repo` when one serves it (with `fork_args` added), else as a
    process of its own. Either way it holds one tool slot while it runs.

    Raises:
        ToolError: the module could not be started, or timed out.
    """
    full_env = tool_env(env)
    server = fork_server(repo, path, full_env, module)
    with tool_slot():  # the fork works like a tool process: one slot
        if server is not None:
            try:
                return server.run(module, [*args, *fork_args], path, full_env, timeout)
            except OSError as exc:
                run_logger().warning(
                    "%s: fork server failed (%s); running %s itself", path.name, exc, module
                )
        return run_tool(
            [venv_tool(path, "python"), "-m", module, *args], cwd=path, env=env, timeout=timeout
        )

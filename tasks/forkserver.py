"""A pre-imported fork server: `python -m <module>` runs without paying for the imports again.

Run by a service environment's own interpreter (it imports nothing of the pipeline):

    <service>/.venv/bin/python tasks/forkserver.py SOCKET IDLE_SECONDS MODULE[,MODULE...]

It imports the listed modules (pytest, coverage, fastapi...) once, writes SOCKET.json
(its pid, its interpreter, and the version of every distribution it imported from its
environment), then listens on the Unix socket SOCKET. Each request (one JSON line:
module, args, cwd, env, the requesting service's environment, an output file) is handled
in a forked child that forks once more to run `python -m <module> <args>` as that
service's environment would: the working directory, environment variables, `sys.path`
(the service's site-packages with its .pth files, never the server's), `sys.prefix` and
`sys.argv` are the service's, and output goes to the file. The handler answers
`{"pid": ...}` at once and `{"returncode": ...}` when the run ends, with subprocess's
convention (negative: killed by that signal). The pipeline uses a server only for an
environment that has exactly the imported distributions at the same versions
(tasks/forking.py checks), so what ran is what the service's own environment runs.

The server exits when idle for IDLE_SECONDS, when its parent exits, or when its own
environment is removed (the run's worktree is gone).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import os
import runpy
import site
import socket
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

POLL_S = 1.0


def normalize(name: str) -> str:
    """A distribution name as packaging compares it (PEP 503)."""
    return "-".join(name.lower().replace("_", "-").replace(".", "-").split("-"))


def imported_distributions(prefix: str) -> dict[str, str]:
    """name -> version of every distribution a module imported from `prefix` belongs to."""
    owners = importlib.metadata.packages_distributions()
    found: dict[str, str] = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None) or ""
        if "." in name or not path.startswith(prefix):
            continue
        for dist in owners.get(name, []):
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                found[normalize(dist)] = importlib.metadata.version(dist)
    return found


def stdlib_path() -> list[str]:
    """The interpreter's own `sys.path` entries: no site-packages, no .pth-added sources."""
    base = (sys.base_prefix, sys.base_exec_prefix)
    return [
        p
        for p in sys.path
        if p.startswith(base) and not p.startswith(sys.prefix) and "-packages" not in p
    ]


def preload(modules: list[str]) -> None:
    """Import `modules`, quietly; one that does not import is left out."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module in modules:
            with contextlib.suppress(Exception):
                importlib.import_module(module)


def exit_code(code: object) -> int:
    """The process exit code `sys.exit(code)` gives."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def run_module(request: dict[str, Any], base_path: list[str]) -> None:
    """In the forked child: become `python -m module args` of the request's environment."""
    fd = os.open(request["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.path[:] = [request["cwd"], *base_path]
        site.addsitedir(request["site"])
        sys.prefix = sys.exec_prefix = request["prefix"]
        sys.executable = str(Path(request["prefix"]) / "bin" / "python")
        sys.path_importer_cache.clear()
        importlib.invalidate_caches()
        sys.argv = [request["module"], *request["args"]]
        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exit_code(exc.code)
    except BaseException:  # noqa: BLE001 - reported as the run's output, like an uncaught error
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def handle(conn: socket.socket, base_path: list[str]) -> None:
    """In the forked handler: run one request in a child of its own; answer pid, then code."""
    os.setpgid(0, 0)
    stream = conn.makefile("rw", encoding="utf-8")
    request = json.loads(stream.readline())
    child = os.fork()
    if child == 0:
        stream.close()
        conn.close()
        run_module(request, base_path)
    stream.write(json.dumps({"pid": child, "pgid": os.getpgid(0)}) + "\n")
    stream.flush()
    _, status = os.waitpid(child, 0)
    stream.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
    stream.flush()


def reap() -> None:
    """Wait for finished handlers (so their CPU time counts as the server's children's)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def serve(path: str, idle_s: float, modules: list[str]) -> None:
    """Preload, announce, then fork a handler per connection until idle or orphaned."""
    parent = os.getppid()
    sys.path[:] = [p for p in sys.path if p != str(Path(__file__).resolve().parent)]
    base_path = stdlib_path()
    preload(modules)
    info = {
        "pid": os.getpid(),
        "python": sys.version,
        "base_prefix": sys.base_prefix,
        "prefix": sys.prefix,
        "distributions": imported_distributions(sys.prefix),
    }
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    listener.settimeout(POLL_S)
    Path(path + ".json.tmp").write_text(json.dumps(info), encoding="utf-8")
    Path(path + ".json.tmp").replace(path + ".json")
    last = time.monotonic()
    try:
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                reap()
                gone = os.getppid() != parent or not Path(sys.prefix).is_dir()
                if gone or time.monotonic() - last > idle_s:
                    return
                continue
            last = time.monotonic()
            if os.fork() == 0:
                listener.close()
                code = 0
                try:
                    handle(conn, base_path)
                except BaseException:  # noqa: BLE001 - the client sees the connection close
                    code = 1
                finally:
                    os._exit(code)
            conn.close()
            reap()
    finally:
        listener.close()
        for leftover in (path, path + ".json"):
            Path(leftover).unlink(missing_ok=True)


if __name__ == "__main__":
    serve(sys.argv[1], float(sys.argv[2]), [m for m in sys.argv[3].split(",") if m])

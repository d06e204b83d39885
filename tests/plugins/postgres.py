"""A real Prefect server on a real PostgreSQL, for tests that need the team's database.

Session fixture `postgres_prefect` yields a `PostgresPrefect`:

- a private PostgreSQL cluster (Debian's `postgresql`, version 15 here): `initdb` into a
  temporary directory owned by the `postgres` system user (initdb refuses root, so as root
  it runs under `runuser -u postgres --`), on a free loopback port, listening on 127.0.0.1
  only (scram-sha-256 password auth for 127.0.0.1, trust on the Unix socket in that
  private directory), with a role `prefect` (random password) owning a database `prefect`;
- `prefect server start --host 127.0.0.1 --port PORT --no-ui` on it, with
  `PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://prefect:***@127.0.0.1:PORT/prefect`,
  analytics off, its own PREFECT_HOME, its log in a file; ready when `GET /api/health`
  answers (120 s, else the test fails with the log's tail).

Both are stopped at session end, also when the start failed half-way (the postmaster gets
SIGINT, a fast shutdown; the server's whole process group gets SIGTERM, then SIGKILL), and
both get the same signal from the kernel when the test process dies without its teardown
(tests/plugins/lifetime.py). Missing PostgreSQL
binaries fail the test with what to install (Debian package `postgresql`); nothing skips.

API:
    pg.api_url             "http://127.0.0.1:<port>/api" of the Prefect server
    pg.database_url        the connection URL with the password (never printed; repr hides it)
    pg.database_url_masked the same with the password as "***" (for messages)
    pg.prefect_home        the server's PREFECT_HOME
    pg.log_path            the Prefect server's log file
    pg.postgres_log_path   PostgreSQL's log file
    pg.pg_port, pg.socket_dir, pg.data_dir
    pg.sql(query)          run SQL on database `prefect` as the superuser through psql over
                           the Unix socket; returns psql's unaligned, tuples-only output
    pg.postgres_start_s, pg.prefect_start_s   measured start-up times (seconds)

It does not touch the session's own test server (tests/conftest.py, `prefect_test_harness`):
point a client at this one explicitly, e.g.

    with temporary_settings(updates={PREFECT_API_URL: pg.api_url}):
        my_flow()

or give `PREFECT_API_URL=pg.api_url` to a subprocess.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker

from tests.plugins.lifetime import stop, tied

PG_ROOT = Path("/usr/lib/postgresql")  # Debian: one <major>/bin per installed version
PG_USER = "postgres"  # the system user that owns the cluster when we run as root
DB_NAME = "prefect"
DB_ROLE = "prefect"
HEALTH_TIMEOUT_S = 120.0
_TIMINGS: list[str] = []  # shown in the terminal summary when the fixture ran
INSTALL_HINT = (
    "install Debian's `postgresql` package (apt-get install -y postgresql; "
    "scripts/install-system-deps.sh should list it)"
)


@dataclass(frozen=True)
class PostgresPrefect:
    """A running Prefect server backed by a private PostgreSQL cluster."""

    api_url: str
    database_url: str = field(repr=False)
    prefect_home: Path
    log_path: Path
    postgres_log_path: Path
    pg_port: int
    socket_dir: Path
    data_dir: Path
    bin_dir: Path
    postgres_start_s: float
    prefect_start_s: float
    _servers: list[subprocess.Popen[bytes]] = field(repr=False, default_factory=list)

    @property
    def database_url_masked(self) -> str:
        """`database_url` with the password replaced by `***`."""
        return _mask(self.database_url)

    def restart(self) -> float:
        """Stop the Prefect server (SIGTERM, as an operator would) and start it again on the
        same port, database and home; returns the seconds it was unreachable."""
        _stop_server(self._servers[-1])
        down = time.monotonic()
        port = int(self.api_url.rsplit(":", 1)[1].split("/")[0])
        server = _spawn_server(self.prefect_home, self.database_url, port, self.log_path)
        self._servers.append(server)
        _wait_healthy(server, self.api_url, self.log_path)
        return time.monotonic() - down

    def sql(self, query: str, *, timeout: float = 30) -> str:
        """Run `query` on database `prefect` as the superuser; psql's `-At` output, stripped."""
        return _psql(self.bin_dir, self.socket_dir, self.pg_port, query, DB_NAME, timeout).strip()


def _mask(url: str) -> str:
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def _free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pg_bin_dir() -> Path:
    """The newest /usr/lib/postgresql/<major>/bin with initdb and postgres; fail if none."""
    candidates = sorted(
        (p for p in PG_ROOT.glob("*/bin") if (p / "initdb").exists() and (p / "postgres").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    if not candidates:
        pytest.fail(
            f"PostgreSQL is not installed: no {PG_ROOT}/<version>/bin/initdb and postgres. "
            f"The postgres_prefect fixture needs it: {INSTALL_HINT}.",
            pytrace=False,
        )
    return candidates[0]


def _as_owner() -> list[str]:
    """Command prefix that runs a PostgreSQL tool as a non-root user."""
    if os.geteuid() != 0:
        return []
    if shutil.which("runuser") is None:
        pytest.fail("running as root needs `runuser` (util-linux) to start PostgreSQL")
    return ["runuser", "-u", PG_USER, "--"]


def _run(cmd: list[str], what: str, *, timeout: float = 120, stdin: str | None = None) -> str:
    proc = subprocess.run(
        cmd, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        pytest.fail(
            f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}",
            pytrace=False,
        )
    return proc.stdout


def _psql(bin_dir: Path, socket_dir: Path, port: int, sql: str, db: str, timeout: float) -> str:
    """SQL on stdin (so secrets never reach a command line), stop at the first error."""
    cmd = [
        *_as_owner(),
        str(bin_dir / "psql"),
        "-X",
        "-q",
        "-At",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        str(socket_dir),
        "-p",
        str(port),
        "-U",
        PG_USER,
        "-d",
        db,
    ]
    return _run(cmd, "psql", timeout=timeout, stdin=sql)


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _init_cluster(bin_dir: Path, base: Path, data_dir: Path) -> None:
    """initdb a private cluster in `data_dir`, then replace its pg_hba.conf with ours."""
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam(PG_USER)
        except KeyError:
            pytest.fail(f"no `{PG_USER}` system user to own the cluster: {INSTALL_HINT}")
        os.chown(base, owner.pw_uid, owner.pw_gid)
    base.chmod(0o700)
    _run(
        [
            *_as_owner(),
            str(bin_dir / "initdb"),
            "-D",
            str(data_dir),
            "-U",
            PG_USER,
            "-E",
            "UTF8",
            "--no-locale",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
        ],
        "initdb",
    )
    # Only the socket in our private directory and 127.0.0.1 with a password; no ::1, no LAN.
    (data_dir / "pg_hba.conf").write_text(
        "# written by tests/plugins/postgres.py\n"
        "local all all trust\n"
        "host  all all 127.0.0.1/32 scram-sha-256\n"
    )


def _postmaster_start(
    bin_dir: Path, base: Path, data_dir: Path, log: Path
) -> tuple[subprocess.Popen[bytes], int]:
    """The postmaster in the foreground on a free port (retried if the port is taken
    meanwhile), ready once `pg_isready` says so. It is tied to the test process (`tied`):
    if that dies without its teardown, the kernel sends SIGINT, PostgreSQL's fast shutdown
    (`pg_ctl start` would leave a daemon that outlives the run)."""
    user = PG_USER if os.geteuid() == 0 else None
    last = ""
    for _ in range(3):
        port = _free_port()
        argv = [
            str(bin_dir / "postgres"),
            "-D",
            str(data_dir),
            "-p",
            str(port),
            "-k",
            str(base),
            "-c",
            "listen_addresses=127.0.0.1",
        ]
        with log.open("ab") as out:
            proc = subprocess.Popen(
                tied(argv, "INT", user=user),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            ready = [str(bin_dir / "pg_isready"), "-q", "-h", str(base), "-p", str(port)]
            if subprocess.run(ready, timeout=30, check=False).returncode == 0:
                return proc, port
            time.sleep(0.2)
        _postmaster_stop(proc)
        last = f"exit {proc.returncode}\n--- {log} ---\n{_tail(log)}"
        if "already in use" not in last:
            break
    pytest.fail(f"PostgreSQL did not start:\n{last}", pytrace=False)


def _postmaster_stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT (fast shutdown: sessions ended, a clean checkpoint), SIGKILL if it lingers."""
    stop(proc, signal.SIGINT, timeout=30)


def _server_env(prefect_home: Path, database_url: str) -> dict[str, str]:
    """The parent's environment minus every PREFECT_* setting, plus the server's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_API_DATABASE_CONNECTION_URL=database_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        # Concurrency leases outlive a server restart (the default keeps them in memory,
        # which would leave a held slot taken forever once the server restarts).
        PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE="prefect.server.concurrency.lease_storage.filesystem",
        # An expired lease is revoked within a second, not up to 15 s (the default loop) after
        # its end: the tests of a killed holder wait for that revocation.
        PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS="1",
    )
    return env


def _spawn_server(
    prefect_home: Path, database_url: str, port: int, log: Path
) -> subprocess.Popen[bytes]:
    with log.open("ab") as log_file:
        return subprocess.Popen(
            tied(
                [
                    sys.executable,
                    "-m",
                    "prefect",
                    "server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--no-ui",
                    "--analytics-off",
                ]
            ),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=_server_env(prefect_home, database_url),
            cwd=prefect_home,
            start_new_session=True,
        )


def _stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (it runs in its own session; children may
    outlive the leader), then SIGKILL the group."""
    stop(proc, timeout=20, group=True)


def _wait_healthy(proc: subprocess.Popen[bytes], api_url: str, log: Path) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"the Prefect server exited ({proc.returncode}) before it was healthy; "
                f"{log}:\n{_tail(log)}",
                pytrace=False,
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.25)
    pytest.fail(
        f"the Prefect server at {api_url} was not healthy after {HEALTH_TIMEOUT_S:.0f} s; "
        f"{log}:\n{_tail(log)}",
        pytrace=False,
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Report the measured start-up times when the fixture was used."""
    for line in _TIMINGS:
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def postgres_prefect() -> Iterator[PostgresPrefect]:
    """A Prefect server on a private PostgreSQL cluster, for the whole session."""
    bin_dir = _pg_bin_dir()
    base = Path(tempfile.mkdtemp(prefix="elice-pg-"))
    prefect_home = Path(tempfile.mkdtemp(prefix="elice-pg-prefect-"))
    data_dir = base / "data"
    pg_log = base / "postgres.log"
    server_log = prefect_home / "server.log"
    server: subprocess.Popen[bytes] | None = None
    postmaster: subprocess.Popen[bytes] | None = None
    try:
        started = time.monotonic()
        _init_cluster(bin_dir, base, data_dir)
        postmaster, pg_port = _postmaster_start(bin_dir, base, data_dir, pg_log)
        password = secrets.token_hex(16)
        _psql(
            bin_dir,
            base,
            pg_port,
            f"CREATE ROLE {DB_ROLE} LOGIN PASSWORD '{password}';\n"
            f"CREATE DATABASE {DB_NAME} OWNER {DB_ROLE};\n",
            "postgres",
            60,
        )
        postgres_start_s = time.monotonic() - started
        database_url = f"postgresql+asyncpg://{DB_ROLE}:{password}@127.0.0.1:{pg_port}/{DB_NAME}"

        started = time.monotonic()
        for attempt in range(3):
            port = _free_port()
            api_url = f"http://127.0.0.1:{port}/api"
            server = _spawn_server(prefect_home, database_url, port, server_log)
            try:
                _wait_healthy(server, api_url, server_log)
                break
            except pytest.fail.Exception:
                port_taken = "address already in use" in _tail(server_log, 200).lower()
                _stop_server(server)
                server = None
                if not port_taken or attempt == 2:
                    raise
        prefect_start_s = time.monotonic() - started
        _TIMINGS.append(
            f"postgres_prefect: PostgreSQL {bin_dir.parent.name} up in {postgres_start_s:.1f} s "
            f"(initdb, start, role and database), Prefect server healthy on it in "
            f"{prefect_start_s:.1f} s"
        )

        assert server is not None  # the loop either broke with a healthy server or raised
        handle = PostgresPrefect(
            api_url=api_url,
            database_url=database_url,
            prefect_home=prefect_home,
            log_path=server_log,
            postgres_log_path=pg_log,
            pg_port=pg_port,
            socket_dir=base,
            data_dir=data_dir,
            bin_dir=bin_dir,
            postgres_start_s=postgres_start_s,
            prefect_start_s=prefect_start_s,
            _servers=[server],
        )
        yield handle
        server = handle._servers[-1]
    finally:
        # Events this process emitted for this server go out now: once it is gone, their
        # queue would retry at interpreter exit for many minutes.
        APILogWorker.drain_all(timeout=30)
        EventsWorker.drain_all(timeout=30)
        if server is not None:
            _stop_server(server)
        if postmaster is not None:
            _postmaster_stop(postmaster)
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(prefect_home, ignore_errors=True)

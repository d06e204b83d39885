"""The Prefect server a team shares runs on PostgreSQL: runs land there, concurrency holds."""

from __future__ import annotations

import asyncio
import threading
import uuid

import asyncpg
import pytest
from prefect import flow
from prefect.client.orchestration import SyncPrefectClient
from prefect.context import get_run_context
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Completed, Running

from tests.plugins import postgres as postgres_plugin
from tests.plugins.postgres import PostgresPrefect

RUNS_PER_CLIENT = 20


@flow(name="pg-smoke", persist_result=False)
def pg_smoke(token: str) -> str:
    """Return this run's id, so the test can look it up in PostgreSQL."""
    return str(get_run_context().flow_run.id)


@flow(name="pg-concurrent")
def pg_concurrent() -> None:
    """Only its name is used: the threads create runs of it through the API."""


def test_flow_run_lands_in_postgres(postgres_prefect: PostgresPrefect) -> None:
    pg = postgres_prefect
    session_api = PREFECT_API_URL.value()
    assert session_api != pg.api_url

    token = uuid.uuid4().hex
    with temporary_settings(updates={PREFECT_API_URL: pg.api_url}):
        run_id = pg_smoke(token)

    # the session's own server is untouched
    assert PREFECT_API_URL.value() == session_api
    row = pg.sql(
        "select f.name, r.state_type, r.parameters->>'token' from flow_run r "
        f"join flow f on f.id = r.flow_id where r.id = '{run_id}'"
    )
    assert row == f"pg-smoke|COMPLETED|{token}"
    # the schema is Prefect's, migrated by the server itself on this database
    assert pg.sql("select count(*) from alembic_version") == "1"


def test_two_concurrent_clients_no_database_locked(postgres_prefect: PostgresPrefect) -> None:
    pg = postgres_prefect
    prefix = f"pgc-{uuid.uuid4().hex[:8]}"
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def client_thread(n: int) -> None:
        try:
            with SyncPrefectClient(api=pg.api_url) as client:
                barrier.wait(timeout=30)
                for i in range(RUNS_PER_CLIENT):
                    run = client.create_flow_run(pg_concurrent, name=f"{prefix}-{n}-{i}")
                    for state in (Running(), Completed()):
                        result = client.set_flow_run_state(run.id, state)
                        assert result.status.value == "ACCEPT", result
        except BaseException as exc:  # collected and re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=client_thread, args=(n,)) for n in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors

    counts = pg.sql(
        "select state_type, count(*) from flow_run "
        f"where name like '{prefix}-%' group by state_type"
    )
    assert counts == f"COMPLETED|{2 * RUNS_PER_CLIENT}"
    log = pg.log_path.read_text(errors="replace")
    assert "database is locked" not in log
    assert "Traceback" not in log, log[-4000:]


def test_database_is_private_and_password_protected(postgres_prefect: PostgresPrefect) -> None:
    pg = postgres_prefect
    password = pg.database_url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    assert password not in repr(pg)
    assert password not in pg.database_url_masked
    assert password not in pg.log_path.read_text(errors="replace")
    assert password not in pg.postgres_log_path.read_text(errors="replace")
    assert pg.sql("show listen_addresses") == "127.0.0.1"
    assert pg.sql("select count(*) from pg_extension where extname = 'pg_trgm'") == "1"

    async def connect(secret: str) -> str:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=pg.pg_port, user="prefect", password=secret, database="prefect"
        )
        try:
            return str(await conn.fetchval("select current_user"))
        finally:
            await conn.close()

    assert asyncio.run(connect(password)) == "prefect"
    with pytest.raises(asyncpg.InvalidPasswordError):
        asyncio.run(connect("wrong"))


def test_missing_postgresql_fails_naming_the_package(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(postgres_plugin, "PG_ROOT", tmp_path)  # no <version>/bin/initdb here
    with pytest.raises(pytest.fail.Exception, match="Debian's `postgresql` package"):
        postgres_plugin._pg_bin_dir()

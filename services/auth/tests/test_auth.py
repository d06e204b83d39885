from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session as DbSession

from auth import main
from auth.db import Database, SessionRow
from auth.main import app

client = TestClient(app)
ALICE = {"username": "alice_1", "password": "correct horse battery"}


def sample(name: str, **labels: str) -> float | None:
    value: float | None = app.state.metrics.registry.get_sample_value(
        name, {"service": "auth", **labels}
    )
    return value


def test_app_smoke() -> None:
    assert client.get("/health").json()["service"] == "auth"
    ready = client.get("/ready").json()
    assert ready["checks"] == {"database": True}


def test_register_login_lookup() -> None:
    assert client.post("/auth/accounts", json=ALICE).status_code == 201
    assert client.post("/auth/accounts", json=ALICE).status_code == 409
    session = client.post("/auth/sessions", json=ALICE).json()
    assert session["username"] == "alice_1"
    assert client.get(f"/auth/sessions/{session['session_id']}").json() == session


def test_accounts_live_in_the_database() -> None:
    bob = {"username": "bob_2", "password": "another long secret"}
    assert client.post("/auth/accounts", json=bob).status_code == 201
    # A second engine on the same URL (another replica) sees the account and logs in.
    other = Database()
    with DbSession(other.engine) as s:
        query = text("SELECT count(*) FROM accounts WHERE username = 'bob_2'")
        assert s.execute(query).scalar_one() == 1
    other.engine.dispose()
    assert client.post("/auth/sessions", json=bob).status_code == 201


def test_bad_logins_are_counted_by_reason() -> None:
    client.post("/auth/accounts", json=ALICE)
    before_wrong = sample("auth_login_failures_total", reason="wrong_password")
    before_unknown = sample("auth_login_failures_total", reason="unknown_user")
    assert before_wrong is not None and before_unknown is not None
    wrong = {"username": "alice_1", "password": "not the password"}
    assert client.post("/auth/sessions", json=wrong).status_code == 401
    assert client.post("/auth/sessions", json=wrong).status_code == 401
    nobody = {"username": "nobody", "password": "whatever12345"}
    assert client.post("/auth/sessions", json=nobody).status_code == 401
    assert client.post("/auth/sessions", json=ALICE).status_code == 201
    bad = {"username": "X", "password": "short"}
    assert client.post("/auth/accounts", json=bad).status_code == 422
    assert sample("auth_login_failures_total", reason="wrong_password") == before_wrong + 2
    assert sample("auth_login_failures_total", reason="unknown_user") == before_unknown + 1
    text = client.get("/metrics").text
    assert 'auth_login_failures_total{reason="wrong_password",service="auth"}' in text


def test_pool_gauges_follow_checked_out_connections() -> None:
    pool = {"pool": "default"}
    assert sample("db_pool_size", **pool) == 2
    assert sample("db_pool_max_overflow", **pool) == 1
    idle_before = sample("db_pool_checked_out_connections", **pool)
    assert idle_before == 0
    held = [main.db.engine.connect() for _ in range(3)]  # pool_size + max_overflow: all of it
    try:
        assert sample("db_pool_checked_out_connections", **pool) == 3
        assert "db_pool_checked_out_connections" in client.get("/metrics").text
    finally:
        for conn in held:
            conn.close()
    assert sample("db_pool_checked_out_connections", **pool) == 0
    assert (sample("db_pool_idle_connections", **pool) or 0) >= 1


def test_expired_session() -> None:
    with DbSession(main.db.engine) as s, s.begin():
        s.add(SessionRow(session_id="old", username="bob", expires_at=1))
    assert client.get("/auth/sessions/old").status_code == 404

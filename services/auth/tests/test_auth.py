from fastapi.testclient import TestClient

from auth import main
from auth.main import app

client = TestClient(app)
ALICE = {"username": "alice_1", "password": "correct horse battery"}


def test_app_smoke() -> None:
    assert client.get("/health").json()["service"] == "auth"


def test_register_login_lookup() -> None:
    assert client.post("/auth/accounts", json=ALICE).status_code == 201
    assert client.post("/auth/accounts", json=ALICE).status_code == 409
    session = client.post("/auth/sessions", json=ALICE).json()
    assert session["username"] == "alice_1"
    assert client.get(f"/auth/sessions/{session['session_id']}").json() == session


def test_bad_logins() -> None:
    wrong = {"username": "alice_1", "password": "not the password"}
    assert client.post("/auth/sessions", json=wrong).status_code == 401
    nobody = {"username": "nobody", "password": "whatever12345"}
    assert client.post("/auth/sessions", json=nobody).status_code == 401
    bad = {"username": "X", "password": "short"}
    assert client.post("/auth/accounts", json=bad).status_code == 422


def test_expired_session() -> None:
    main._sessions["old"] = main.Session(session_id="old", username="bob", expires_at=1)
    assert client.get("/auth/sessions/old").status_code == 404

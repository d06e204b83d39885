import pytest
from authn import bearer_header
from fastapi.testclient import TestClient

from user.main import app

client = TestClient(app)


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTHN_SECRET", "user-test")


def test_app_smoke() -> None:
    assert client.get("/health").json()["service"] == "user"


def test_profile_lifecycle() -> None:
    me = bearer_header("minji")
    assert client.get("/users/minji").status_code == 404
    assert client.get("/users/me", headers=me).json()["display_name"] == "minji"
    change = {"display_name": "Minji K", "locale": "en-US"}
    resp = client.patch("/users/me", headers=me, json=change)
    assert resp.json()["locale"] == "en-US"
    assert client.get("/users/minji").json() == {"username": "minji", "display_name": "Minji K"}


def test_update_validation() -> None:
    me = bearer_header("joon")
    assert client.patch("/users/me", headers=me, json={"locale": "xx-XX"}).status_code == 422
    assert client.patch("/users/me", headers=me, json={"display_name": ""}).status_code == 422
    assert client.patch("/users/me", json={"bio": "hi"}).status_code == 401

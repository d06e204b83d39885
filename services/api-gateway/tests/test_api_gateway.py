import pytest
from authn import bearer_header
from fastapi.testclient import TestClient

from api_gateway.main import app

client = TestClient(app)


def test_app_smoke() -> None:
    assert client.get("/health").json()["service"] == "api-gateway"


def test_routes_cover_all_upstreams() -> None:
    routes = client.get("/routes").json()
    assert len({r["service"] for r in routes}) == 11
    course = {"prefix": "/courses", "service": "course", "url": "http://course:8004/courses"}
    assert course in routes


def test_resolve_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPSTREAM_PAYMENT", "http://127.0.0.1:9009/")
    body = client.get("/resolve", params={"path": "/payments/p-1"}).json()
    assert body["url"] == "http://127.0.0.1:9009/payments/p-1"
    assert client.get("/resolve", params={"path": "/paymentsx"}).status_code == 404
    assert client.get("/resolve", params={"path": "no-slash"}).status_code == 422


def test_whoami(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTHN_SECRET", "gateway-test")
    assert client.get("/whoami").status_code == 401
    resp = client.get("/whoami", headers=bearer_header("ana", scopes=["b", "a"]))
    assert resp.json() == {"subject": "ana", "scopes": ["a", "b"]}

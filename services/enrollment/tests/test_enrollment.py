import pytest
from authn import bearer_header
from fastapi.testclient import TestClient

from enrollment.main import app

client = TestClient(app)


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTHN_SECRET", "enrollment-test")


def enroll(student: str, course: str) -> int:
    resp = client.post("/enrollments", json={"course": course}, headers=bearer_header(student))
    return resp.status_code


def test_app_smoke() -> None:
    assert client.get("/health").json()["service"] == "enrollment"


def test_capacity_and_duplicates() -> None:
    assert enroll("a", "k8s-ops") == 201
    assert enroll("a", "k8s-ops") == 409
    assert enroll("b", "k8s-ops") == 201
    assert enroll("c", "k8s-ops") == 409
    assert enroll("c", "cobol") == 404
    assert client.post("/enrollments", json={"course": "k8s-ops"}).status_code == 401


def test_list_and_withdraw() -> None:
    assert enroll("dana", "data-viz") == 201
    mine = client.get("/enrollments", headers=bearer_header("dana")).json()
    assert [e["course"] for e in mine] == ["data-viz"]
    eid = mine[0]["id"]
    assert client.delete(f"/enrollments/{eid}", headers=bearer_header("eve")).status_code == 404
    assert client.delete(f"/enrollments/{eid}", headers=bearer_header("dana")).status_code == 204
    assert client.get("/enrollments", headers=bearer_header("dana")).json() == []

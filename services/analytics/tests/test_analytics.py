from fastapi.testclient import TestClient

from analytics.main import app

client = TestClient(app)


def test_app_smoke() -> None:
    assert client.get("/health").json()["service"] == "analytics"


def test_ingest_and_stats() -> None:
    batch = [{"name": "video.watched", "user": f"u{n % 3}", "value": n} for n in range(1, 21)]
    assert client.post("/events", json=batch).json() == {"accepted": 20}
    body = client.get("/stats/video.watched").json()
    assert (body["count"], body["users"], body["total"], body["mean"]) == (20, 3, 210, 10.5)
    assert 19 <= body["p95"] <= 20


def test_single_event_and_rejections() -> None:
    client.post("/events", json=[{"name": "quiz.passed", "user": "a", "value": 0.8}])
    assert client.get("/stats/quiz.passed").json()["p95"] == 0.8
    assert client.get("/stats/never").status_code == 404
    assert client.post("/events", json=[]).status_code == 422
    bad = [{"name": "ok_name", "user": "a"}, {"name": "Bad Name", "user": "a"}]
    assert client.post("/events", json=bad).status_code == 422
    assert client.get("/stats/ok_name").status_code == 404

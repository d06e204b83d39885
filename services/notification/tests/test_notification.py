from fastapi.testclient import TestClient

from notification.main import app

client = TestClient(app)


def test_app_smoke() -> None:
    assert client.get("/health").json()["service"] == "notification"


def test_render_and_outbox() -> None:
    request = {
        "recipient": "jin@example.kr",
        "template": "enrolled",
        "variables": {"name": "Jin", "course": "Pods 101"},
    }
    sent = client.post("/notifications", json=request)
    assert sent.status_code == 202
    assert sent.json()["subject"] == "Enrolled in Pods 101"
    box = client.get("/notifications", params={"recipient": "jin@example.kr"}).json()
    assert [n["body"] for n in box] == ["Hi Jin, you are enrolled in Pods 101. See you in class!"]


def test_rejections() -> None:
    missing = {"recipient": "a@b.co", "template": "receipt", "variables": {"amount": "1"}}
    detail = client.post("/notifications", json=missing).json()["detail"]
    assert detail == "missing variable payment"
    unknown = {"recipient": "a@b.co", "template": "nope"}
    assert client.post("/notifications", json=unknown).status_code == 404
    bad = {"recipient": "not-an-address", "template": "welcome"}
    assert client.post("/notifications", json=bad).status_code == 422

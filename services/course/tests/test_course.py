from fastapi.testclient import TestClient

from course.main import app

client = TestClient(app)


def test_app_smoke() -> None:
    assert client.get("/health").json()["service"] == "course"


def test_filters_combine() -> None:
    slugs = [c["slug"] for c in client.get("/courses", params={"tag": "data"}).json()]
    assert slugs == ["data-viz", "ml-intro"]
    short = client.get("/courses", params={"tag": "data", "max_hours": 10}).json()
    assert [c["slug"] for c in short] == ["data-viz"]
    assert len(client.get("/courses").json()) == 4
    assert client.get("/courses", params={"level": "advanced"}).json()[0]["slug"] == "k8s-ops"


def test_bad_filters_rejected() -> None:
    assert client.get("/courses", params={"level": "expert"}).status_code == 422
    assert client.get("/courses", params={"max_hours": 0}).status_code == 422


def test_get_course() -> None:
    assert client.get("/courses/python-101").json()["hours"] == 12
    assert client.get("/courses/cobol").status_code == 404

from fastapi.testclient import TestClient

from content.main import app

client = TestClient(app)


def test_app_smoke() -> None:
    assert client.get("/health").json()["service"] == "content"


def test_table_of_contents_is_ordered_without_bodies() -> None:
    toc = client.get("/courses/python-101/lessons").json()
    assert [x["id"] for x in toc] == ["py-1", "py-2"]
    assert "body" not in toc[0]
    assert client.get("/courses/none/lessons").status_code == 404


def test_reading_time() -> None:
    assert client.get("/lessons/py-1").json()["reading_minutes"] == 1
    assert client.get("/lessons/py-2").json()["reading_minutes"] == 2  # 360 words
    assert client.get("/lessons/zz").status_code == 404

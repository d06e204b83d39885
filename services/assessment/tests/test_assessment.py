import pytest
from authn import bearer_header
from fastapi.testclient import TestClient

from assessment.main import app

client = TestClient(app)


def submit(answers: dict[str, int]) -> dict[str, object]:
    resp = client.post(
        "/quizzes/python-basics/submissions", json={"answers": answers}, headers=bearer_header("s1")
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTHN_SECRET", "assessment-test")


def test_app_smoke() -> None:
    assert client.get("/health").json()["service"] == "assessment"


def test_questions_hide_answers() -> None:
    questions = client.get("/quizzes/python-basics").json()
    assert [q["id"] for q in questions] == ["q1", "q2", "q3"]
    assert all("answer" not in q for q in questions)
    assert client.get("/quizzes/nope").status_code == 404


def test_grading() -> None:
    perfect = submit({"q1": 1, "q2": 2, "q3": 0})
    assert (perfect["score"], perfect["max_score"], perfect["passed"]) == (4, 4, True)
    partial = submit({"q1": 1, "q3": 0})
    assert (partial["score"], partial["passed"], partial["wrong"]) == (3, True, ["q2"])
    assert submit({"q1": 0})["passed"] is False


def test_bad_submissions() -> None:
    url = "/quizzes/python-basics/submissions"
    body = {"answers": {"q9": 1}}
    assert client.post(url, json=body, headers=bearer_header("s1")).status_code == 422
    assert client.post(url, json=body).status_code == 401

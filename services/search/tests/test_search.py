from fastapi.testclient import TestClient

from search.main import Document, Index, app

client = TestClient(app)


def test_app_smoke() -> None:
    assert client.get("/health").json()["service"] == "search"


def test_ranking_prefers_title_matches() -> None:
    hits = client.get("/search", params={"q": "Python"}).json()
    assert [h["id"] for h in hits] == ["python-101", "ml-intro"]
    assert hits[0]["score"] > hits[1]["score"]
    assert client.get("/search", params={"q": "cobol"}).json() == []
    assert client.get("/search", params={"q": ""}).status_code == 422


def test_reindex_replaces_document() -> None:
    doc = {"id": "rust-1", "title": "Rust", "text": "ownership borrowing"}
    assert client.put("/documents", json=doc).status_code == 204
    assert client.get("/search", params={"q": "borrowing"}).json()[0]["id"] == "rust-1"
    client.put("/documents", json={**doc, "text": "traits"})
    assert client.get("/search", params={"q": "borrowing"}).json() == []


def test_index_limit() -> None:
    index = Index()
    for n in range(5):
        index.add(Document(id=f"d{n}", title="t", text="same words"))
    assert [h.id for h in index.search("same", limit=2)] == ["d0", "d1"]

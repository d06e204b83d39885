from fastapi.testclient import TestClient

from media.main import app

client = TestClient(app)
PNG = {
    "filename": "Diagram.PNG",
    "content_type": "image/png",
    "size": 2048,
    "sha256": "ab" * 32,
    "width": 1600,
    "height": 900,
}


def test_app_smoke() -> None:
    assert client.get("/health").json()["service"] == "media"


def test_register_and_thumbnail() -> None:
    first = client.post("/uploads", json=PNG)
    assert first.status_code == 201
    key = first.json()["key"]
    assert key.endswith(".png")
    assert client.post("/uploads", json=PNG).json()["key"] == key
    thumb = client.get(f"/uploads/{key}/thumbnail").json()
    assert thumb == {"key": key, "width": 320, "height": 180}
    assert client.get(f"/uploads/{key}/thumbnail", params={"width": 1920}).json()["width"] == 1600
    assert client.get("/uploads/zzz/thumbnail").status_code == 404


def test_policy() -> None:
    pdf = {**PNG, "filename": "notes.pdf", "content_type": "application/pdf", "width": None}
    key = client.post("/uploads", json=pdf).json()["key"]
    assert client.get(f"/uploads/{key}/thumbnail").status_code == 409
    assert client.post("/uploads", json={**PNG, "content_type": "text/html"}).status_code == 415
    assert client.post("/uploads", json={**PNG, "size": 10**9}).status_code == 413
    assert client.post("/uploads", json={**PNG, "filename": "x.exe"}).status_code == 422

import pytest
from authn import bearer_header
from fastapi.testclient import TestClient

from payment.main import app

client = TestClient(app)


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTHN_SECRET", "payment-test")


def pay(amount: str, currency: str, key: str = "key-00000001", who: str = "p1"):
    headers = {**bearer_header(who), "Idempotency-Key": key}
    body = {"course": "ml-intro", "amount": amount, "currency": currency}
    return client.post("/payments", json=body, headers=headers)


def test_app_smoke() -> None:
    assert client.get("/health").json()["service"] == "payment"


def test_idempotent_capture_and_lookup() -> None:
    first = pay("49000", "KRW")
    assert first.status_code == 201
    again = pay("49000", "KRW")
    assert again.json()["id"] == first.json()["id"]
    pid = first.json()["id"]
    mine = client.get(f"/payments/{pid}", headers=bearer_header("p1"))
    assert mine.json()["status"] == "captured"
    assert client.get(f"/payments/{pid}", headers=bearer_header("p2")).status_code == 404


@pytest.mark.parametrize(
    ("amount", "currency", "code"),
    [
        ("19.99", "USD", 201),
        ("19.990", "USD", 201),
        ("19.999", "USD", 422),
        ("100.5", "KRW", 422),
        ("0", "EUR", 422),
        ("-5", "USD", 422),
        ("NaN", "USD", 422),
        ("10000.01", "USD", 422),
        ("5", "JPY", 422),
    ],
)
def test_amount_validation(amount: str, currency: str, code: int) -> None:
    assert pay(amount, currency, key=f"key-{amount}-{currency}").status_code == code


def test_requires_auth_and_key() -> None:
    body = {"course": "x", "amount": "1", "currency": "USD"}
    anonymous = {"Idempotency-Key": "k" * 8}
    assert client.post("/payments", json=body, headers=anonymous).status_code == 401
    assert client.post("/payments", json=body, headers=bearer_header("p1")).status_code == 422

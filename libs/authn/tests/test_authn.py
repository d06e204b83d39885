import pytest
from fastapi import APIRouter, Depends
from fastapi.testclient import TestClient
from servicekit import create_app

from authn import (
    AuthnConfigError,
    AuthnError,
    CurrentUser,
    Principal,
    bearer_header,
    issue_token,
    require_scope,
    verify_api_key,
    verify_token,
)

SECRET = "test-secret-value"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTHN_SECRET", SECRET)
    monkeypatch.setenv("AUTHN_API_KEYS", "k-one, k-two")


def test_round_trip() -> None:
    token = issue_token("alice", scopes=["b", "a", "a"], now=1000, ttl_seconds=60)
    user = verify_token(token, now=1059)
    assert user == Principal("alice", frozenset({"a", "b"}), 1060)
    assert user.has_scope("a")
    assert not user.has_scope("c")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t + "x",
        lambda t: "v2" + t[2:],
        lambda t: t.rsplit(".", 1)[0],
        lambda t: t.replace(t.split(".")[1], t.split(".")[1][::-1]),
    ],
)
def test_tampered_tokens_fail(mutate) -> None:
    with pytest.raises(AuthnError):
        verify_token(mutate(issue_token("alice")))


def test_other_secret_and_expiry_fail() -> None:
    with pytest.raises(AuthnError, match="signature"):
        verify_token(issue_token("alice", secret="other"))
    with pytest.raises(AuthnError, match="expired"):
        verify_token(issue_token("alice", now=0, ttl_seconds=5), now=5)


def test_signed_garbage_claims_fail() -> None:
    from authn import tokens

    body = f"v1.{tokens._b64(b'not json')}"
    forged = f"{body}.{tokens._sign(body, SECRET.encode())}"
    with pytest.raises(AuthnError, match="claims"):
        verify_token(forged)


def test_missing_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTHN_SECRET")
    with pytest.raises(AuthnConfigError):
        issue_token("alice")
    with pytest.raises(ValueError, match="subject"):
        issue_token("", secret="s")


def test_api_keys() -> None:
    assert verify_api_key("k-two")
    assert not verify_api_key("k-three")
    assert not verify_api_key("", ["", " "])
    assert verify_api_key("x", ["x"])


router = APIRouter()


@router.get("/me")
def me(user: CurrentUser) -> dict[str, str]:
    return {"sub": user.subject}


@router.get("/admin", dependencies=[Depends(require_scope("admin"))])
def admin() -> dict[str, bool]:
    return {"ok": True}


def test_dependencies() -> None:
    client = TestClient(create_app("authn-demo", routers=[router], env={}))
    assert client.get("/me").status_code == 401
    assert client.get("/me").headers["www-authenticate"] == "Bearer"
    bearer = bearer_header("bob")
    assert client.get("/me", headers=bearer).json() == {"sub": "bob"}
    assert client.get("/me", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/admin", headers=bearer).status_code == 403
    admin_token = {"Authorization": f"Bearer {issue_token('root', scopes=['admin'])}"}
    assert client.get("/admin", headers=admin_token).status_code == 200
    assert client.get("/admin", headers={"X-API-Key": "k-one"}).status_code == 200
    assert client.get("/me", headers={"X-API-Key": "bad"}).status_code == 401

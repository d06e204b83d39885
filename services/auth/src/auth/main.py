"""Accounts: register with a password (scrypt-hashed), log in, look up a session.

Accounts and sessions live in a SQL database (``auth.db``); failed logins are counted in
``auth_login_failures_total{service,reason}`` for the LoginFailureSpike alert.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Final

from fastapi import APIRouter, HTTPException, status
from prometheus_client import Counter
from pydantic import BaseModel, Field
from servicekit import create_app, env_int
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as DbSession

from auth.db import Account, Database, SessionRow

SESSION_TTL_SECONDS = env_int("SESSION_TTL_SECONDS", 3600)
# Why a login failed, for the metric only: the answer is the same 401 either way.
FAILURE_REASONS: Final = ("unknown_user", "wrong_password")


class Credentials(BaseModel):
    username: str = Field(pattern=r"^[a-z][a-z0-9_]{2,31}$")
    password: str = Field(min_length=10, max_length=128)


class Session(BaseModel):
    session_id: str
    username: str
    expires_at: int


def _hash(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1)


db = Database()
router = APIRouter(prefix="/auth", tags=["auth"])


@router.post("/accounts", status_code=status.HTTP_201_CREATED)
def register(creds: Credentials) -> dict[str, str]:
    salt = secrets.token_bytes(16)
    account = Account(username=creds.username, salt=salt, password_hash=_hash(creds.password, salt))
    try:
        with DbSession(db.engine) as s, s.begin():
            s.add(account)
    except IntegrityError as exc:
        raise HTTPException(status_code=409, detail="username taken") from exc
    return {"username": creds.username}


@router.post("/sessions", status_code=status.HTTP_201_CREATED)
def login(creds: Credentials) -> Session:
    with DbSession(db.engine) as s:
        account = s.get(Account, creds.username)
        salt, expected = (account.salt, account.password_hash) if account else (b"\0" * 16, b"")
    # Hash even for unknown users so timing does not reveal which usernames exist.
    if not hmac.compare_digest(_hash(creds.password, salt), expected):
        LOGIN_FAILURES.labels("auth", "unknown_user" if account is None else "wrong_password").inc()
        raise HTTPException(status_code=401, detail="invalid username or password")
    session = Session(
        session_id=secrets.token_urlsafe(24),
        username=creds.username,
        expires_at=int(time.time()) + SESSION_TTL_SECONDS,
    )
    with DbSession(db.engine) as s, s.begin():
        s.add(SessionRow(**session.model_dump()))
    return session


@router.get("/sessions/{session_id}")
def get_session(session_id: str) -> Session:
    with DbSession(db.engine) as s:
        row = s.get(SessionRow, session_id)
        if row is None or row.expires_at <= time.time():
            raise HTTPException(status_code=404, detail="unknown or expired session")
        return Session(session_id=row.session_id, username=row.username, expires_at=row.expires_at)


app = create_app("auth", routers=[router], readiness_checks={"database": db.ping})
app.state.metrics.track_pool(db.engine.pool, max_overflow=db.max_overflow)
LOGIN_FAILURES = Counter(
    "auth_login_failures_total",
    "Failed logins by reason (the client always gets the same 401).",
    ["service", "reason"],
    registry=app.state.metrics.registry,
)
for _reason in FAILURE_REASONS:
    LOGIN_FAILURES.labels("auth", _reason)  # exported as 0 from the start, so rate() works

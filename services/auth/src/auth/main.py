"""Accounts: register with a password (scrypt-hashed), log in, look up a session."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, Field
from servicekit import create_app, env_int

SESSION_TTL_SECONDS = env_int("SESSION_TTL_SECONDS", 3600)


class Credentials(BaseModel):
    username: str = Field(pattern=r"^[a-z][a-z0-9_]{2,31}$")
    password: str = Field(min_length=10, max_length=128)


class Session(BaseModel):
    session_id: str
    username: str
    expires_at: int


_accounts: dict[str, tuple[bytes, bytes]] = {}  # username -> (salt, scrypt hash)
_sessions: dict[str, Session] = {}


def _hash(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1)


router = APIRouter(prefix="/auth", tags=["auth"])


@router.post("/accounts", status_code=status.HTTP_201_CREATED)
def register(creds: Credentials) -> dict[str, str]:
    if creds.username in _accounts:
        raise HTTPException(status_code=409, detail="username taken")
    salt = secrets.token_bytes(16)
    _accounts[creds.username] = (salt, _hash(creds.password, salt))
    return {"username": creds.username}


@router.post("/sessions", status_code=status.HTTP_201_CREATED)
def login(creds: Credentials) -> Session:
    salt, expected = _accounts.get(creds.username, (b"\0" * 16, b""))
    # Hash even for unknown users so timing does not reveal which usernames exist.
    if not hmac.compare_digest(_hash(creds.password, salt), expected):
        raise HTTPException(status_code=401, detail="invalid username or password")
    session = Session(
        session_id=secrets.token_urlsafe(24),
        username=creds.username,
        expires_at=int(time.time()) + SESSION_TTL_SECONDS,
    )
    _sessions[session.session_id] = session
    return session


@router.get("/sessions/{session_id}")
def get_session(session_id: str) -> Session:
    session = _sessions.get(session_id)
    if session is None or session.expires_at <= time.time():
        raise HTTPException(status_code=404, detail="unknown or expired session")
    return session


app = create_app("auth", routers=[router])

"""HMAC-SHA256 signed bearer tokens and API-key checks.

Token format: ``v1.<base64url(JSON claims)>.<base64url(HMAC-SHA256(secret, "v1." + claims))>``
with claims ``sub`` (subject), ``scopes`` (list) and ``exp`` (unix seconds).
The secret comes from ``AUTHN_SECRET`` unless passed explicitly; there is no default.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from servicekit.settings import env_str

VERSION = "v1"
SIGNING_KEY_VAR = "AUTHN_SECRET"
API_KEYS_ENV = "AUTHN_API_KEYS"


class AuthnError(Exception):
    """A credential was missing, malformed, forged or expired."""


class AuthnConfigError(RuntimeError):
    """The service has no secret configured."""


@dataclass(frozen=True)
class Principal:
    subject: str
    scopes: frozenset[str] = field(default_factory=frozenset)
    expires_at: int = 0

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes


def _secret(secret: str | None) -> bytes:
    value = secret if secret is not None else env_str(SIGNING_KEY_VAR, "")
    if not value:
        raise AuthnConfigError(f"{SIGNING_KEY_VAR} is not set")
    return value.encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(message: str, key: bytes) -> str:
    return _b64(hmac.new(key, message.encode(), hashlib.sha256).digest())


def issue_token(
    subject: str,
    *,
    scopes: Iterable[str] = (),
    ttl_seconds: int = 3600,
    secret: str | None = None,
    now: float | None = None,
) -> str:
    """Sign a token for ``subject`` valid for ``ttl_seconds``."""
    if not subject:
        raise ValueError("subject must not be empty")
    issued = int(time.time() if now is None else now)
    claims = {"sub": subject, "scopes": sorted(set(scopes)), "exp": issued + ttl_seconds}
    body = f"{VERSION}.{_b64(json.dumps(claims, separators=(',', ':')).encode())}"
    return f"{body}.{_sign(body, _secret(secret))}"


def bearer_header(
    subject: str, *, scopes: Iterable[str] = (), secret: str | None = None
) -> dict[str, str]:
    """``{"Authorization": "Bearer <token>"}`` for a fresh token: handy for clients and tests."""
    return {"Authorization": f"Bearer {issue_token(subject, scopes=scopes, secret=secret)}"}


def verify_token(token: str, *, secret: str | None = None, now: float | None = None) -> Principal:
    """Check signature (constant time) and expiry; return who the token speaks for."""
    key = _secret(secret)
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != VERSION:
        raise AuthnError("malformed token")
    body = f"{parts[0]}.{parts[1]}"
    if not hmac.compare_digest(_sign(body, key), parts[2]):
        raise AuthnError("bad signature")
    try:
        claims = json.loads(_unb64(parts[1]))
        subject, scopes, expires = str(claims["sub"]), claims["scopes"], int(claims["exp"])
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise AuthnError("malformed claims") from exc
    if expires <= int(time.time() if now is None else now):
        raise AuthnError("token expired")
    return Principal(subject=subject, scopes=frozenset(map(str, scopes)), expires_at=expires)


def verify_api_key(presented: str, allowed: Iterable[str] | None = None) -> bool:
    """Constant-time membership test against ``allowed`` (default: ``AUTHN_API_KEYS``, comma list).

    Every candidate is compared, so timing does not reveal which key almost matched.
    """
    if allowed is None:
        allowed = env_str(API_KEYS_ENV, "").split(",")
    keys = [key.strip() for key in allowed if key.strip()]
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented.encode(), key.encode())
    return matched and bool(presented)

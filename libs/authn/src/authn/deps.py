"""FastAPI dependencies: ``Depends(require_user)`` and ``Depends(require_scope("x"))``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Security, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from authn.tokens import AuthnError, Principal, verify_api_key, verify_token

_bearer = HTTPBearer(auto_error=False)
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False)
_log = logging.getLogger("authn")


def _unauthorized(reason: str) -> HTTPException:
    _log.info("authentication rejected", extra={"reason": reason})
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail="not authenticated",
        headers={"WWW-Authenticate": "Bearer"},
    )


def require_user(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    api_key: Annotated[str | None, Security(_api_key)],
) -> Principal:
    """A bearer token signed with ``AUTHN_SECRET``, or an ``X-API-Key`` from ``AUTHN_API_KEYS``.

    API keys authenticate a service (subject ``service``, scope ``*``).
    """
    if credentials is not None:
        try:
            return verify_token(credentials.credentials)
        except AuthnError as exc:
            raise _unauthorized(str(exc)) from exc
    if api_key is not None:
        if verify_api_key(api_key):
            return Principal(subject="service", scopes=frozenset({"*"}))
        raise _unauthorized("unknown api key")
    raise _unauthorized("no credentials")


CurrentUser = Annotated[Principal, Depends(require_user)]


def require_scope(scope: str) -> Callable[[Principal], Principal]:
    """A dependency that also demands ``scope`` (403 otherwise)."""

    def check(user: CurrentUser) -> Principal:
        if not (user.has_scope(scope) or user.has_scope("*")):
            raise HTTPException(status_code=status.HTTP_403_FORBIDDEN, detail=f"needs {scope}")
        return user

    return check

"""Authentication helpers shared by the services that need them."""

from authn.deps import CurrentUser, require_scope, require_user
from authn.tokens import (
    AuthnConfigError,
    AuthnError,
    Principal,
    bearer_header,
    issue_token,
    verify_api_key,
    verify_token,
)

__all__ = [
    "AuthnConfigError",
    "AuthnError",
    "CurrentUser",
    "Principal",
    "bearer_header",
    "issue_token",
    "require_scope",
    "require_user",
    "verify_api_key",
    "verify_token",
]

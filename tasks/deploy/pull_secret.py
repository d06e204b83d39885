"""The image pull secret of an environment's namespace, from its registry's login.

The kubernetes target writes one `kubernetes.io/dockerconfigjson` Secret per environment
namespace (`PULL_NAME`) holding the login of the registry the environment's images
come from, and its Deployments name it in `imagePullSecrets`: nodes then pull with the
environment's own credentials instead of needing their own.

When it is written again (`stale`): static credentials whenever they differ from the
stored ones; a short-lived token (ECR's, valid 12 h) only once the stored one was written
more than `TOKEN_MAX_AGE` ago or expires within `TOKEN_MIN_LEFT`: every run fetches a
new token, and rewriting the Secret at each deploy would churn for nothing.
The annotations record when it was written and when its token expires; the credentials
themselves go only into the Secret's data, never into a log line or a message.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from blocks.registry import OciRegistry
from tasks.deploy.manifests import ANNOTATION_PREFIX

PULL_NAME = "elice-registry-pull"
DOCKERCONFIG_TYPE = "kubernetes.io/dockerconfigjson"
DATA_KEY = ".dockerconfigjson"
WRITTEN_AT = f"{ANNOTATION_PREFIX}written-at"
EXPIRES_AT = f"{ANNOTATION_PREFIX}token-expires-at"
REGISTRY = f"{ANNOTATION_PREFIX}registry"
TOKEN_MAX_AGE = timedelta(hours=6)  # half an ECR token's 12 h lifetime
TOKEN_MIN_LEFT = timedelta(hours=2)


def docker_config(registry: OciRegistry) -> dict[str, Any]:
    """The `.dockerconfigjson` document of `registry`'s login (it must have one)."""
    if registry.username is None or registry.password is None:
        msg = f"the registry {registry.address} has no login to put into a pull secret"
        raise ValueError(msg)
    user = registry.username.get_secret_value()
    password = registry.password.get_secret_value()
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    entry = {"username": user, "password": password, "auth": auth}
    return {"auths": {registry.address: entry}}


def secret_object(
    namespace: str, registry: OciRegistry, now: datetime, expires_at: datetime | None
) -> dict[str, Any]:
    """The Secret to apply: the login in its data, when and for which registry in its
    annotations (no credential in metadata)."""
    annotations = {WRITTEN_AT: now.isoformat(), REGISTRY: registry.address}
    if expires_at is not None:
        annotations[EXPIRES_AT] = expires_at.isoformat()
    data = json.dumps(docker_config(registry), sort_keys=True).encode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": PULL_NAME,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "elice-devops"},
            "annotations": annotations,
        },
        "type": DOCKERCONFIG_TYPE,
        "data": {DATA_KEY: base64.b64encode(data).decode()},
    }


def stored_config(secret: Mapping[str, Any]) -> dict[str, Any] | None:
    """The `.dockerconfigjson` a live Secret holds (None: none, or not readable)."""
    raw = (secret.get("data") or {}).get(DATA_KEY)
    if secret.get("type") != DOCKERCONFIG_TYPE or not raw:
        return None
    try:
        document = json.loads(base64.b64decode(raw))
    except (binascii.Error, ValueError):
        return None
    return document if isinstance(document, dict) else None


def stale(
    secret: Mapping[str, Any] | None,
    registry: OciRegistry,
    now: datetime,
    expires_at: datetime | None,
) -> str | None:
    """Why the live `secret` must be written again, or None when it serves as it is.

    `expires_at`: when the wanted login expires (a token), None for static credentials.
    The reason names no credential: it is logged.
    """
    if secret is None:
        return "none yet"
    stored = stored_config(secret)
    if stored is None:
        return f"not a {DOCKERCONFIG_TYPE} Secret this pipeline can read"
    wanted = docker_config(registry)
    if stored == wanted:
        return None
    entry = (stored.get("auths") or {}).get(registry.address)
    if not isinstance(entry, dict) or entry.get("username") != wanted["auths"][
        registry.address
    ].get("username"):
        return f"it holds another registry or user than {registry.address}'s login"
    if expires_at is None:
        return "the registry's credentials changed"
    annotations = secret.get("metadata", {}).get("annotations") or {}
    written = _time(annotations.get(WRITTEN_AT))
    expires = _time(annotations.get(EXPIRES_AT))
    if written is None or now - written > TOKEN_MAX_AGE:
        return f"its token was written more than {_hours(TOKEN_MAX_AGE)} ago"
    if expires is None or expires - now < TOKEN_MIN_LEFT:
        return f"its token expires within {_hours(TOKEN_MIN_LEFT)}"
    return None


def _time(value: Any) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else None


def _hours(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 3600:g} h"

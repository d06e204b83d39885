"""The Prefect API a read command talks to, found and read over plain HTTP; no Prefect.

The same API `cicd.common.read_api` points Prefect at: the configured one (Prefect's
settings when Prefect is already loaded in this process; else PREFECT_API_URL from the
environment or from the active profile of PREFECT_HOME's profiles.toml), else the local
stack's server while it answers, else none. The stack's server gets the stack's auth
string unless one is configured; it is sent, never printed. The standard library's HTTP
client, not httpx: importing httpx alone took 0.3 s, half of this path's start-up.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blocks.stack import load_stack_auth, load_stack_info

TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Api:
    """A Prefect API and the headers that authenticate to it."""

    url: str
    headers: dict[str, str] = field(default_factory=dict, repr=False)


class ApiError(Exception):
    """The API answered with an error, or not at all; the message names no secret."""


def _profile() -> dict[str, Any]:
    """The active profile's settings from PREFECT_HOME's profiles.toml ({} when none)."""
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    name = os.environ.get("PREFECT_PROFILE") or data.get("active") or "ephemeral"
    profile = data.get("profiles", {}).get(name, {})
    return profile if isinstance(profile, dict) else {}


def configured() -> tuple[str | None, str | None, str | None]:
    """(PREFECT_API_URL, PREFECT_API_AUTH_STRING, PREFECT_API_KEY) as configured."""
    if "prefect.settings" in sys.modules:  # Prefect loaded: its settings (contexts) decide
        from prefect.settings import (  # noqa: PLC0415 - already imported
            PREFECT_API_AUTH_STRING,
            PREFECT_API_KEY,
            PREFECT_API_URL,
        )

        key = PREFECT_API_KEY.value()
        secret = key.get_secret_value() if hasattr(key, "get_secret_value") else key
        return PREFECT_API_URL.value(), PREFECT_API_AUTH_STRING.value(), secret
    profile = _profile()

    def setting(name: str) -> str | None:
        return os.environ.get(name) or (str(profile[name]) if profile.get(name) else None)

    return (
        setting("PREFECT_API_URL"),
        setting("PREFECT_API_AUTH_STRING"),
        setting("PREFECT_API_KEY"),
    )


def _get(
    url: str, headers: dict[str, str], timeout: float, *, proxies: bool = True
) -> tuple[int, str, bytes]:
    """(status, reason, body) of a GET; `proxies`: the environment's proxies apply.

    Raises:
        OSError: no answer (refused, unreachable, timed out).
    """
    if not url.startswith(("http://", "https://")):
        msg = f"not an HTTP URL: {url.split(':', 1)[0]}:"
        raise OSError(msg)
    handlers = [] if proxies else [urllib.request.ProxyHandler({})]
    opener = urllib.request.build_opener(*handlers)
    try:
        request = urllib.request.Request(url, headers=headers)  # noqa: S310 - checked above
        with opener.open(request, timeout=timeout) as answer:
            return int(answer.status), str(answer.reason), bytes(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, str(exc.reason), b""


def answers(api_url: str) -> bool:
    """The server at `api_url` answers its health check within 2 s (no proxy asked)."""
    try:
        return _get(f"{api_url.rstrip('/')}/health", {}, 2, proxies=False)[0] == 200
    except OSError:
        return False


def find_api() -> Api | None:
    """The configured API, else the stack's server while it answers, else None."""
    url, auth, key = configured()
    stack = load_stack_info()
    recorded = (stack.prefect_api_url or "").rstrip("/") if stack else ""
    if not url:
        if not recorded or not answers(recorded):
            return None
        url = recorded
    if not auth and recorded and recorded == url.rstrip("/"):
        auth = load_stack_auth()
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    elif key:
        headers["Authorization"] = f"Bearer {key}"
    return Api(url=url.rstrip("/"), headers=headers)


def read_block_data(api: Api, type_slug: str, name: str) -> dict[str, Any] | None:
    """The data of the block document `name` of type `type_slug`, None when none is saved.

    Raises:
        ApiError: the API refused (401, 403, 5xx: the status is named) or did not answer.
    """
    path = f"/block_types/slug/{type_slug}/block_documents/name/{name}"
    query = "?include_secrets=true"
    try:
        status, reason, body = _get(api.url + path + query, api.headers, TIMEOUT_S)
    except OSError as exc:
        msg = f"Prefect API {api.url}: no answer reading block {name!r}: {type(exc).__name__}"
        raise ApiError(msg) from None
    if status == 404:
        return None
    if status != 200:
        msg = f"Prefect API {api.url}: {status} {reason} reading block {name!r}"
        raise ApiError(msg)
    data = json.loads(body).get("data")
    return data if isinstance(data, dict) else {}

"""When the namespace's pull secret is written again (tasks/deploy/pull_secret.py).

The Secret's life on a real API server (written, named by pods, refreshed, refused) is in
test_kubernetes_real.py; these are the rules alone, on Secrets built as the API returns them.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from blocks.registry import OciRegistry
from core.records import utcnow
from tasks.deploy.pull_secret import WRITTEN_AT, secret_object, stale

NOW = utcnow()
IN_12_H = NOW + timedelta(hours=12)


def login(password: str, user: str = "AWS", address: str = "123.dkr.example") -> OciRegistry:
    return OciRegistry(address=address, username=user, password=password)


def written(password: str, ago: timedelta = timedelta(0), **kw: Any) -> dict[str, Any]:
    return secret_object("ns", login(password, **kw), NOW - ago, IN_12_H - ago)


def test_a_missing_or_foreign_secret_is_written() -> None:
    assert stale(None, login("p" * 12), NOW, None) == "none yet"
    opaque = {"type": "Opaque", "data": {"x": "eQ=="}}
    assert "can read" in str(stale(opaque, login("p" * 12), NOW, None))


def test_static_credentials_are_written_when_they_change() -> None:
    assert stale(written("a" * 12), login("a" * 12), NOW, None) is None
    assert stale(written("a" * 12), login("b" * 12), NOW, None) == (
        "the registry's credentials changed"
    )


def test_a_token_is_rewritten_only_when_old_or_about_to_expire() -> None:
    fresh = written("a" * 12, timedelta(hours=1))
    assert stale(fresh, login("b" * 12), NOW, IN_12_H) is None
    old = written("a" * 12, timedelta(hours=7))
    assert "more than 6 h ago" in str(stale(old, login("b" * 12), NOW, IN_12_H))
    rewound = written("a" * 12)
    rewound["metadata"]["annotations"][WRITTEN_AT] = "not a time"
    assert "more than 6 h ago" in str(stale(rewound, login("b" * 12), NOW, IN_12_H))
    ending = secret_object("ns", login("a" * 12), NOW, NOW + timedelta(hours=1))
    assert "expires within 2 h" in str(stale(ending, login("b" * 12), NOW, IN_12_H))


def test_another_registry_or_user_is_written_at_once_and_never_named_by_secret() -> None:
    token = "secret-token-" + "z" * 20
    reason = stale(written(token, user="other"), login("b" * 12), NOW, IN_12_H)
    assert reason is not None
    assert "another registry or user" in reason
    assert token not in reason
    moved = stale(written(token, address="elsewhere:5000"), login(token), NOW, IN_12_H)
    assert "another registry" in str(moved)

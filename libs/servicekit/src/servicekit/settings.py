"""Runtime settings read from environment variables.

Everything a service learns from its environment goes through here, so the names
are documented in one place (see ``libs/README.md``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass

UNKNOWN = "unknown"
_TRUE = frozenset({"1", "true", "yes", "on"})
_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARN": logging.WARNING,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
}


def _environ(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def env_str(name: str, default: str = UNKNOWN, env: Mapping[str, str] | None = None) -> str:
    """Return a stripped variable, or ``default`` when it is missing or blank."""
    value = _environ(env).get(name, "").strip()
    return value or default


def env_flag(name: str, env: Mapping[str, str] | None = None) -> bool:
    """True for 1/true/yes/on (any case)."""
    return _environ(env).get(name, "").strip().lower() in _TRUE


def env_int(name: str, default: int = 0, env: Mapping[str, str] | None = None) -> int:
    raw = _environ(env).get(name, "").strip()
    try:
        return int(raw) if raw else default
    except ValueError:
        return default


def log_level(env: Mapping[str, str] | None = None) -> int:
    """``LOG_LEVEL`` as a logging level; WARN is an alias of WARNING, unknown -> INFO."""
    return _LEVELS.get(env_str("LOG_LEVEL", "INFO", env).upper(), logging.INFO)


@dataclass(frozen=True)
class BuildInfo:
    """What ``GET /version`` reports: which build of which service runs where."""

    service: str
    version: str
    release: str
    digest: str
    commit: str
    environment: str

    @classmethod
    def from_env(cls, service: str, env: Mapping[str, str] | None = None) -> BuildInfo:
        return cls(
            service=service,
            version=env_str("APP_VERSION", env=env),
            release=env_str("APP_RELEASE", env=env),
            digest=env_str("IMAGE_DIGEST", env=env),
            commit=env_str("GIT_COMMIT", env=env),
            environment=env_str("ENVIRONMENT", env=env),
        )

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Faults:
    """Deliberate failures for release drills (rollback tests).

    ``FAULT_HEALTH=1``: ``/health`` and ``/ready`` answer 503.
    ``FAULT_LATENCY_MS=N``: every request except /health, /ready, /metrics sleeps N ms.
    ``FAULT_ERROR_PERCENT=N``: N of every 100 requests except /health, /ready, /metrics
    answer 500 (evenly spread): healthy to its probes, failing under traffic.
    ``FAULT_ENVIRONMENTS=a,b``: when set, the faults apply only if ``ENVIRONMENT`` is listed.
    """

    health: bool = False
    latency_ms: int = 0
    error_percent: int = 0

    @property
    def active(self) -> bool:
        return self.health or self.latency_ms > 0 or self.error_percent > 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Faults:
        scope = [
            item.strip().lower()
            for item in _environ(env).get("FAULT_ENVIRONMENTS", "").split(",")
            if item.strip()
        ]
        if scope and env_str("ENVIRONMENT", "", env).lower() not in scope:
            return cls()
        return cls(
            health=env_flag("FAULT_HEALTH", env),
            latency_ms=max(0, env_int("FAULT_LATENCY_MS", 0, env)),
            error_percent=min(100, max(0, env_int("FAULT_ERROR_PERCENT", 0, env))),
        )

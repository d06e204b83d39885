"""What every `cicd` command shares: options, configuration, errors, the Prefect API.

The local stack is imported only by the commands that start it (`use_stack`).

Credentials: a command talking to the local stack's server sends the stack's auth string
(`<stack dir>/prefect-auth`) as PREFECT_API_AUTH_STRING, unless one is configured. For any
other server (a team's PREFECT_API_URL), PREFECT_API_AUTH_STRING / PREFECT_API_KEY apply as
Prefect reads them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.settings import (
    PREFECT_API_AUTH_STRING,
    PREFECT_API_URL,
    PREFECT_SERVER_ALLOW_EPHEMERAL_MODE,
    temporary_settings,
)
from prefect.settings.legacy import Setting
from rich.console import Console

from blocks.config import PipelineConfig
from blocks.stack import StackInfo, load_stack_auth, load_stack_info
from cicd.light_api import answers
from cicd.options import ConfigOption, TargetOption, cli_settings, fail, split_names
from core.errors import ConfigError, GateError
from core.settings import Settings
from tasks.masking import mask_auth_string
from tasks.trusted import pipeline_config

__all__ = [
    "ConfigOption",
    "TargetOption",
    "api_settings",
    "cli_config",
    "cli_settings",
    "fail",
    "prefect_api",
    "read_api",
    "service_ports",
    "split_names",
    "use_stack",
]


def cli_config(source: str | None, settings: Settings | None = None) -> PipelineConfig:
    """The configuration from `source` (else ELICE_CONFIG, else the embedded default); an
    invalid one ends the command with exit code 2."""
    try:
        return pipeline_config(settings or cli_settings(), source)
    except ConfigError as exc:
        fail(str(exc))


def service_ports(settings: Settings | None = None) -> dict[int, str]:
    """The loopback ports the configured docker-target services listen on (port ->
    `<environment> <service>`), for `ensure_stack` to refuse ports another stack holds;
    empty when the configuration cannot be read here (saved blocks, no server yet)."""
    try:
        cfg = pipeline_config(settings or cli_settings())
    except ConfigError:
        return {}
    return {
        env.host_port(svc.port): f"{env.name} {svc.name}"
        for env in cfg.environments.environments
        if env.target == "docker"
        for svc in cfg.catalog.services
    }


def use_stack(*, prefect: bool = True) -> StackInfo:
    """Bring up the local stack, saying what it starts on stderr (stdout stays for --json);
    tasks find its engine and registry in its record."""
    from cicd.stack_cli import StepPrinter  # noqa: PLC0415 - the stack only when started
    from stack.control import ensure_stack  # noqa: PLC0415

    printer = StepPrinter(Console(stderr=True))
    try:
        return ensure_stack(
            prefect=prefect, worker=prefect, progress=printer, service_ports=service_ports()
        )
    finally:
        printer.close()


def _same_api(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def api_settings(url: str) -> dict[Setting, object]:
    """The settings that point this process at `url`: with the stack's auth string when
    `url` is the local stack's server and no PREFECT_API_AUTH_STRING is configured."""
    updates: dict[Setting, object] = {
        PREFECT_API_URL: url,
        PREFECT_SERVER_ALLOW_EPHEMERAL_MODE: False,
    }
    if PREFECT_API_AUTH_STRING.value() is None:
        stack = load_stack_info()
        if stack is not None and stack.prefect_api_url and _same_api(stack.prefect_api_url, url):
            auth = load_stack_auth()
            if auth is not None:
                mask_auth_string(auth)
                updates[PREFECT_API_AUTH_STRING] = auth
    return updates


@contextmanager
def prefect_api(*, start_stack: bool = False) -> Iterator[str]:
    """Point this process at a Prefect API: the configured one, else the local stack's.

    Raises:
        GateError: no API is configured and the stack runs none.
    """
    current = PREFECT_API_URL.value()
    url = current or os.environ.get("PREFECT_API_URL")
    if start_stack:
        info = use_stack(prefect=not url)
        url = url or info.prefect_api_url
    elif not url:
        stack = load_stack_info()
        url = stack.prefect_api_url if stack else None
    if not url:
        msg = "no Prefect API: set PREFECT_API_URL or start the stack (`cicd stack up --prefect`)"
        raise GateError(msg)
    with temporary_settings(updates=api_settings(url)):
        yield url


@contextmanager
def read_api() -> Iterator[str | None]:
    """For the read commands (`status`, `health`, `audit`, `metrics`) on their full path: the
    configured Prefect API, else the local stack's server while it answers, else none; never
    a temporary server of Prefect's own. Without an API, nothing saved on a server can be
    read: configuration comes from the file, deploy targets and storage from their defaults.
    """
    url = PREFECT_API_URL.value() or os.environ.get("PREFECT_API_URL")
    if not url:
        stack = load_stack_info()
        recorded = stack.prefect_api_url if stack else None
        url = recorded if recorded and answers(recorded) else None
    updates: dict[Setting, object] = (
        api_settings(url) if url else {PREFECT_SERVER_ALLOW_EPHEMERAL_MODE: False}
    )
    with temporary_settings(updates=updates):
        yield url

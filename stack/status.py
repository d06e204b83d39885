"""`stack_status`: each part of the stack and its state, read without Prefect.

The stack's record (`stack.json`), the pid files, who holds which socket (/proc), and a GET
of each part's own address (stack/probe.py); the workers by their pid files
(stack/worker_roles.py). `cicd stack status` imports this module alone, so it answers in
a fraction of a second; `stack.control` re-exports `stack_status` for its other users.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from blocks.stack import StackInfo, load_stack_info, stack_dir
from stack.ports import recorded_port
from stack.probe import (
    engine_alive,
    engine_paths,
    engine_up,
    image_known,
    monitor_up,
    prefect_up,
    registry_up,
)
from stack.steps import StackPart
from stack.worker_roles import worker_parts

BASE_IMAGE = "localhost/python-base:3.11"
"""The Python base image the stack builds (stack/images.py) and the services build on."""


def alert_log_file(root: Path | None = None) -> Path:
    """Where the stack's default alert receiver writes each alert, one JSON line (0600)."""
    return (root or stack_dir()) / "logs" / "alerts.log"


def alert_log_port_file(root: Path) -> Path:
    """Where the stack records the alert log receiver's port (it has no URL in stack.json)."""
    return root / "monitoring" / "alert-log.port"


def recorded_alert_log_port(root: Path) -> int | None:
    try:
        return int(alert_log_port_file(root).read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None


def stack_status(root: Path | None = None) -> list[StackPart]:
    """Each part of the stack: running, stopped, external, present or missing.

    A part is running only when the process the stack started holds its address and
    answers there: something else answering on a recorded port does not count.
    """
    home = root or stack_dir()
    info = load_stack_info(home)
    parts: list[StackPart] = []
    if os.environ.get("DOCKER_HOST"):
        host = os.environ["DOCKER_HOST"]
        state: Literal["running", "stopped", "external"] = "external"
        parts.append(
            StackPart(name="engine", state=state if engine_alive(host) else "stopped", address=host)
        )
    else:
        host = f"unix://{engine_paths(home)[1]}"
        parts.append(
            StackPart(
                name="engine", state="running" if engine_up(home) else "stopped", address=host
            )
        )
    registry = info.registry if info else ""
    port = recorded_port(registry)
    alive = port is not None and registry_up(home, port)
    parts.append(
        StackPart(name="registry", state="running" if alive else "stopped", address=registry)
    )
    parts.append(_image_part(parts[0], BASE_IMAGE))
    url = info.prefect_api_url if info else None
    port = recorded_port(url)
    alive = port is not None and prefect_up(home, port)
    parts.append(
        StackPart(name="prefect", state="running" if alive else "stopped", address=url or "")
    )
    if info is not None and info.prefect_api_url:  # workers run only beside a server
        parts.extend(worker_parts(home))
    if info is not None and (info.prometheus_url or info.alertmanager_url):
        parts.extend(monitoring_status(home, info))
    if info is not None and info.slack_receiver_url:
        port = recorded_port(info.slack_receiver_url)
        alive = port is not None and monitor_up(home, "slack-receiver", port)
        parts.append(
            StackPart(
                name="slack-receiver",
                state="running" if alive else "stopped",
                address=info.slack_receiver_url,
            )
        )
    return parts


def _image_part(engine: StackPart, name: str) -> StackPart:
    present = engine.state != "stopped" and image_known(engine.address, name)
    return StackPart(name="base-image", state="present" if present else "missing", address=name)


def monitoring_status(home: Path, info: StackInfo) -> list[StackPart]:
    """Prometheus, Alertmanager and the alert log receiver, as the stack recorded them."""
    parts = []
    for name, url in (("prometheus", info.prometheus_url), ("alertmanager", info.alertmanager_url)):
        port = recorded_port(url)
        alive = port is not None and monitor_up(home, name, port)
        parts.append(
            StackPart(name=name, state="running" if alive else "stopped", address=url or "")
        )
    port = recorded_alert_log_port(home)
    alive = port is not None and monitor_up(home, "alert-log", port)
    parts.append(
        StackPart(
            name="alert-log",
            state="running" if alive else "stopped",
            address=str(alert_log_file(home)),
        )
    )
    return parts

"""The local OCI registry: docker-registry (distribution) on a loopback port."""

from __future__ import annotations

import functools
from pathlib import Path

from blocks.stack import StackInfo
from stack.ports import choose_port, part_listens, recorded_port
from stack.probe import registry_alive, registry_up
from stack.serve import REUSE_PATIENCE_S, reusable, start_on_port
from stack.steps import Steps
from stack.supervisor import running_part, stop_part
from stack.system import ensure_system_deps
from tasks.process import which

DEFAULT_REGISTRY_PORT = 5000


REGISTRY_CONF = """\
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {data}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
  headers:
    X-Content-Type-Options: [nosniff]
"""


def ensure_registry(root: Path, previous: StackInfo | None, steps: Steps) -> str:
    recorded = recorded_port(previous.registry if previous else None)
    if recorded is not None and reusable(
        functools.partial(part_listens, root, "registry", port=recorded),
        functools.partial(registry_alive, recorded),
        REUSE_PATIENCE_S,
    ):
        pid = running_part(root, "registry")
        steps.info("registry", f"running at 127.0.0.1:{recorded} (pid {pid})")
        return f"127.0.0.1:{recorded}"
    stop_part(root, "registry")
    ensure_system_deps(("docker-registry",), progress=steps.progress)
    data = root / "registry" / "data"
    data.mkdir(parents=True, exist_ok=True)
    conf = root / "registry" / "config.yml"

    def command(port: int) -> tuple[list[str], dict[str, str]]:
        conf.write_text(REGISTRY_CONF.format(data=data, port=port), encoding="utf-8")
        return [which("docker-registry"), "serve", str(conf)], {}

    port, note = choose_port(recorded, DEFAULT_REGISTRY_PORT)
    port = start_on_port(
        root,
        "registry",
        "docker-registry",
        port,
        note,
        command,
        lambda p: registry_up(root, p),
        30,
        steps,
    )
    return f"127.0.0.1:{port}"

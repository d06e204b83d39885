"""What the local stack runs, as the stack records it and the tasks read it.

`cicd stack up` starts the parts and writes a `StackInfo` to `<stack dir>/stack.json`;
tasks that need an engine, a registry or a base image and have no saved block read it
back here. The stack itself lives above the tasks (in `cicd`); this record is the one
fact they share, so it sits below both.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from core.settings import VARIABLES, Settings

STACK_DIR_ENV = VARIABLES["stack_dir"]
STACK_AUTH_FILE = "prefect-auth"
"""The stack's Prefect server auth string (`user:token`), owner-only, in the stack's home."""


class StackInfo(BaseModel):
    """Where the parts of the local stack answer."""

    model_config = ConfigDict(frozen=True)

    docker_host: str = Field(description="Docker API endpoint, e.g. unix:///.../podman.sock")
    registry: str = Field(description="OCI registry address, 127.0.0.1:PORT")
    base_image: str = Field(description="Base image for service builds")
    prefect_api_url: str | None = Field(default=None, description="Local Prefect server API")
    pause_image: str | None = Field(default=None, description="Infra image for kube play")
    prometheus_url: str | None = Field(default=None, description="Local Prometheus server")
    alertmanager_url: str | None = Field(default=None, description="Local Alertmanager")
    slack_receiver_url: str | None = Field(
        default=None, description="Local receiver of Slack's approval buttons"
    )


def stack_dir(settings: Settings | None = None) -> Path:
    """The stack's home: ELICE_STACK_DIR (a documented user setting), else the state dir.

    Without `settings`, the user settings are read here (a caller outside a run).
    """
    return (settings or Settings.from_environ()).resolved_stack_dir()


def stack_info_file(root: Path | None = None) -> Path:
    """The file `cicd stack up` records the running stack in."""
    return (root or stack_dir()) / "stack.json"


GREEN_TARGETS = Path("monitoring") / "green"
"""Under the stack's home: one file_sd file per green container of a blue-green promotion,
written by the docker deployer and read by the stack's Prometheus (`*.json`)."""


def green_targets_dir(root: Path | None = None) -> Path:
    """Where green containers' scrape targets are written (the stack's home, else `root`)."""
    return (root or stack_dir()) / GREEN_TARGETS


def load_stack_info(root: Path | None = None) -> StackInfo | None:
    """The last recorded StackInfo, or None when the stack was never started."""
    path = stack_info_file(root)
    if not path.exists():
        return None
    return StackInfo.model_validate_json(path.read_text(encoding="utf-8"))


def save_stack_info(info: StackInfo, root: Path | None = None) -> None:
    """Record `info` as the running stack."""
    stack_info_file(root).write_text(info.model_dump_json(indent=2), encoding="utf-8")


def stack_auth_file(root: Path | None = None) -> Path:
    """The owner-only file holding the stack's Prefect server auth string."""
    return (root or stack_dir()) / STACK_AUTH_FILE


def load_stack_auth(root: Path | None = None) -> str | None:
    """The auth string the stack's Prefect server requires (`PREFECT_API_AUTH_STRING` of its
    clients), or None when the stack never made one. Never print or log it."""
    path = stack_auth_file(root)
    try:
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return value or None

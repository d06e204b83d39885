"""The stack's system packages, installed with apt-get on Debian when missing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from core.errors import StackError
from stack.steps import Progress, Steps
from tasks.process import run_tool

SYSTEM_DEPS = ("podman", "buildah", "runc", "docker-registry", "debootstrap", "catatonit")
INSTALL_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install-system-deps.sh"


def ensure_system_deps(
    tools: tuple[str, ...] = SYSTEM_DEPS, progress: Progress | None = None
) -> None:
    """Install the stack's system packages when missing (root on Debian only).

    Raises:
        StackError: a tool is missing and cannot be installed here.
    """
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return
    if os.geteuid() != 0 or not Path("/etc/debian_version").exists():
        msg = f"missing {', '.join(missing)}: run {INSTALL_SCRIPT} as root (Debian) first"
        raise StackError(msg)
    what = f"installing {', '.join(missing)} with apt-get (minutes, the first time)"
    with Steps(progress).step("system", what, done="installed"):
        done = run_tool(["bash", str(INSTALL_SCRIPT)], timeout=1800)
        if not done.ok:
            msg = f"{INSTALL_SCRIPT} failed (exit {done.returncode}):\n{done.excerpt(20)}"
            raise StackError(msg)

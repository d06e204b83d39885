"""The Docker-API engine: Podman's API service on a socket of the stack, or DOCKER_HOST."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import time
from pathlib import Path

from core.errors import StackError
from stack.images import PAUSE_IMAGE
from stack.ports import part_listens
from stack.probe import engine_alive, engine_paths, engine_up
from stack.serve import REUSE_PATIENCE_S, reusable, wait_up
from stack.steps import Steps
from stack.supervisor import running_part, spawn_part, stop_part
from stack.system import ensure_system_deps
from tasks.process import which

CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
infra_image = "{pause}"
image_copy_tmp_dir = "{tmp}"
"""
"""The engine's containers.conf. `image_copy_tmp_dir` (and TMPDIR, which the service is
started with) keep the engine's temporary files in the stack's own directory: Podman 4.3
leaves a `digest.txt<N>` behind for every push through its API, which went to /var/tmp."""

LEFTOVER_TMP_S = 3600
"""A leftover temporary file of the engine's older than this is removed when the stack is
next used: no push takes an hour."""


def registries_conf(registry: str) -> str:
    """registries.conf marking the local registry (and loopback) insecure."""
    entries = dict.fromkeys([registry, "127.0.0.1", "localhost"])
    blocks = "".join(f'\n[[registry]]\nlocation = "{e}"\ninsecure = true\n' for e in entries)
    return f"unqualified-search-registries = []\n{blocks}"


def write_if_changed(path: Path, text: str) -> bool:
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    path.write_text(text, encoding="utf-8")
    return True


def directory_gone(pid: int | None) -> bool:
    """Whether process `pid` runs in a directory that was removed since it started: an
    engine started that way (by a stack started from a checkout removed later) answers
    pings but cannot start a container (conmon inherits the directory)."""
    if pid is None:
        return False
    try:
        return str(Path(f"/proc/{pid}/cwd").readlink()).endswith(" (deleted)")
    except OSError:
        return False


def engine_tmp(root: Path) -> Path:
    """The engine's temporary directory, created, without leftovers older than an hour."""
    tmp = root.absolute() / "tmp"
    tmp.mkdir(exist_ok=True)
    cutoff = time.time() - LEFTOVER_TMP_S
    for leftover in tmp.glob("digest.txt*"):
        with contextlib.suppress(OSError):
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink()
    return tmp


def ensure_engine(root: Path, registry: str, steps: Steps) -> str:
    """The engine's DOCKER_HOST; starts Podman's API service when ours does not serve it."""
    if os.environ.get("DOCKER_HOST"):
        host = os.environ["DOCKER_HOST"]
        if not engine_alive(host):
            msg = f"DOCKER_HOST={host} does not answer /_ping; start that engine or unset it"
            raise StackError(msg)
        steps.info("engine", f"using DOCKER_HOST={host}")
        return host
    storage, sock = engine_paths(root)
    conf_dir = root / "conf"
    conf_dir.mkdir(exist_ok=True)
    tmp = engine_tmp(root)
    changed = write_if_changed(
        conf_dir / "containers.conf", CONTAINERS_CONF.format(pause=PAUSE_IMAGE, tmp=tmp)
    )
    changed |= write_if_changed(conf_dir / "registries.conf", registries_conf(registry))
    host = f"unix://{sock}"
    listens = functools.partial(part_listens, root, "engine", socket_path=sock)
    if reusable(listens, lambda: engine_alive(host), REUSE_PATIENCE_S):
        pid = running_part(root, "engine")
        if not changed and not directory_gone(pid):
            steps.info("engine", f"running at {host} (pid {pid})")
            return host
        why = "its configuration changed" if changed else "its working directory was removed"
        steps.info("engine", f"{why}: restarting (containers keep running)")
    stop_part(root, "engine")  # conmon owns the containers: they survive
    ensure_system_deps(progress=steps.progress)
    sock.unlink(missing_ok=True)
    env = {
        "TMPDIR": str(tmp),
        "CONTAINERS_CONF": str(conf_dir / "containers.conf"),
        "CONTAINERS_REGISTRIES_CONF": str(conf_dir / "registries.conf"),
    }
    args = [which("podman"), "--root", str(storage / "root"), "--runroot", str(storage / "run")]
    with steps.step("engine", f"starting podman API service at {host}"):
        # In the stack's own directory: conmon, which the service starts for every
        # container, inherits its working directory and cannot start a container once
        # that directory is gone ("Failed to get working directory", "write child:
        # broken pipe"): a checkout the stack was started from may be removed later.
        spawn_part(root, "engine", [*args, "system", "service", "--time=0", host], env, cwd=root)
        wait_up(root, "engine", "podman system service", lambda: engine_up(root), 60)
    return host


def storage_mounts(root: Path) -> list[Path]:
    """Mount points under the stack's engine storage (`<stack dir>/podman`), deepest first,
    from /proc/self/mountinfo (its fifth field, with the kernel's octal escapes)."""
    storage = engine_paths(root)[0]
    try:
        rows = Path("/proc/self/mountinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    found = []
    for row in rows:
        cols = row.split()
        if len(cols) < 5:
            continue
        point = Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), cols[4]))
        if point == storage or storage in point.parents:
            found.append(point)
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def release_storage(root: Path) -> str:
    """After the engine stopped: unmount the bind mount Podman's overlay driver keeps of its
    own storage (`<storage>/root/overlay` on itself), which outlives the service and makes
    the stack's directory impossible to remove ("Device or resource busy").

    Only when no container uses the storage any more (none of its layers or run files is
    mounted): a container the stack deployed keeps running, and its storage stays mounted.
    Returns a note for the user when something was left mounted, else "".
    """
    mounts = storage_mounts(root)
    driver = engine_paths(root)[0] / "root" / "overlay"
    in_use = [m for m in mounts if m != driver]
    if in_use:
        return (
            f"{len(in_use)} container mounts still use {engine_paths(root)[0]} "
            "(containers keep running); its storage stays mounted"
        )
    if driver in mounts:
        done = subprocess.run(
            ["umount", str(driver)], capture_output=True, text=True, check=False, timeout=30
        )
        if done.returncode != 0:
            return f"could not unmount {driver}: {done.stderr.strip()}"
    return ""

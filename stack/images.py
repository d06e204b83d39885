"""The stack's local images: a Python base image built with debootstrap, a pause image."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import docker
from docker.errors import DockerException, ImageNotFound

from core.errors import StackError
from stack.status import BASE_IMAGE
from stack.steps import Steps
from stack.system import ensure_system_deps
from tasks.engine import engine_client
from tasks.process import run_tool, which

PAUSE_IMAGE = "localhost/podman-pause:catatonit"


DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def debian_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The Debian mirror apt is configured with (deb822 or one-line format)."""
    files = [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for line in text.splitlines():
            found = re.match(r"^\s*(?:deb\s+(?:\[[^]]*]\s+)?|URIs:\s*)(\S+)", line)
            if found and re.search(r"/debian/?$", found.group(1)):
                return found.group(1)
    return "http://deb.debian.org/debian"


def image_present(client: docker.DockerClient, name: str) -> bool:
    try:
        client.images.get(name)
    except ImageNotFound:
        return False
    return True


def _import_rootfs(
    client: docker.DockerClient, rootfs: Path, name: str, changes: list[str]
) -> None:
    with tempfile.TemporaryDirectory(dir=rootfs.parent) as tmp:
        tarball = Path(tmp) / "rootfs.tar"
        done = run_tool(["tar", "-C", str(rootfs), "-cf", str(tarball), "."], timeout=600)
        if not done.ok:
            msg = f"cannot pack {rootfs}: {done.excerpt(10)}"
            raise StackError(msg)
        # "repo:tag" in `repository`: podman ignores the separate tag parameter
        client.api.import_image_from_file(str(tarball), repository=name, changes=changes)


def build_base_image(client: docker.DockerClient, root: Path, name: str = BASE_IMAGE) -> float:
    """Build `name` from Debian bookworm with debootstrap; returns the seconds it took.

    Raises:
        StackError: debootstrap failed.
    """
    ensure_system_deps(("debootstrap",))
    started = time.monotonic()
    work = root / "build"
    work.mkdir(exist_ok=True)
    rootfs = Path(tempfile.mkdtemp(prefix="python-base-", dir=work))
    try:
        include = "--include=python3,python3-venv,ca-certificates"
        args = [which("debootstrap"), "--variant=minbase", include, "bookworm", str(rootfs)]
        done = run_tool([*args, debian_mirror()], timeout=1800)
        if not done.ok:
            msg = f"debootstrap failed (exit {done.returncode}):\n{done.excerpt(20)}"
            raise StackError(msg)
        changes = [f"ENV PATH={DEFAULT_PATH}", "ENV LANG=C.UTF-8", 'CMD ["python3"]']
        _import_rootfs(client, rootfs, name, changes)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    return time.monotonic() - started


def build_pause_image(client: docker.DockerClient, root: Path, name: str = PAUSE_IMAGE) -> None:
    """A pause image for `podman kube play`: catatonit alone in a scratch image."""
    catatonit = Path(shutil.which("catatonit") or "/usr/libexec/podman/catatonit")
    rootfs = Path(tempfile.mkdtemp(prefix="pause-", dir=root))
    try:
        shutil.copy2(catatonit, rootfs / "catatonit")
        changes = ['ENTRYPOINT ["/catatonit", "-P"]']
        _import_rootfs(client, rootfs, name, changes)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


def ensure_images(docker_host: str, root: Path, steps: Steps) -> str | None:
    """Make sure the base (and, on podman, pause) images exist; returns the pause image."""
    client = engine_client(docker_host)
    pause: str | None = None
    try:
        if image_present(client, BASE_IMAGE):
            steps.info("base-image", f"{BASE_IMAGE} present")
        else:
            what = f"building {BASE_IMAGE} with debootstrap (about a minute)"
            with steps.step("base-image", what, done="built"):
                build_base_image(client, root)
        if not os.environ.get("DOCKER_HOST") and shutil.which("catatonit"):
            if not image_present(client, PAUSE_IMAGE):
                with steps.step("pause-image", f"building {PAUSE_IMAGE}", done="built"):
                    build_pause_image(client, root)
            pause = PAUSE_IMAGE
    except DockerException as exc:
        msg = f"engine at {docker_host} failed while preparing images: {exc}"
        raise StackError(msg) from exc
    finally:
        client.close()
    return pause

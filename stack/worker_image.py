"""The worker image: worker/Dockerfile built through a Docker API engine from a context
holding only the pipeline (its packages, config, deployments, the lock)."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from docker.errors import APIError, DockerException

from core.errors import ImageError, ToolError
from tasks.engine import engine_client

CHECKOUT = Path(__file__).resolve().parents[1]
WORKER_DOCKERFILE = "worker/Dockerfile"
WORKER_IMAGE = "localhost/elice-devops-worker:latest"
EXTRA_CA_PATH = ".build/extra-ca.crt"
IMAGE_FILES = ("pyproject.toml", "uv.lock", "README.md", "prefect.yaml", WORKER_DOCKERFILE)
IMAGE_TREES = (
    "blocks",
    "cicd",
    "core",
    "daemons",
    "flows",
    "reconcile",
    "stack",
    "tasks",
    "config",
    "deployments",
)
_SKIPPED = {"__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".venv"}


def worker_build_context(root: Path = CHECKOUT, extra_ca: str | None = None) -> io.BytesIO:
    """The worker image's build context as a tar: the pipeline, its lock, the Dockerfile.

    Raises:
        ValueError: a file the image needs is missing from `root`.
    """
    missing = [f for f in (*IMAGE_FILES, *IMAGE_TREES) if not (root / f).exists()]
    if missing:
        msg = f"{root}: missing {', '.join(missing)}; is this a checkout of elice-devops?"
        raise ValueError(msg)
    files = [root / f for f in IMAGE_FILES]
    for tree in IMAGE_TREES:
        files += [
            p
            for p in sorted((root / tree).rglob("*"))
            if p.is_file()
            and not _SKIPPED.intersection(p.relative_to(root).parts)
            and p.suffix not in {".pyc", ".pyo"}
        ]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in files:
            tar.add(path, arcname=str(path.relative_to(root)), recursive=False)
        data = (extra_ca or "").encode()
        info = tarfile.TarInfo(EXTRA_CA_PATH)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    return buffer


def _image_id(chunks: Iterator[dict[str, Any]]) -> str:
    lines: list[str] = []
    image_id = ""
    for chunk in chunks:
        if "stream" in chunk:
            lines.extend(ln for ln in str(chunk["stream"]).splitlines() if ln.strip())
        if isinstance(chunk.get("aux"), dict):
            image_id = str(chunk["aux"].get("ID", image_id))
        if "error" in chunk or "errorDetail" in chunk:
            error = chunk.get("error") or chunk["errorDetail"].get("message", "")
            tail = "\n".join(lines[-30:])
            msg = f"worker image build failed: {error}\n{tail}"
            raise ImageError(msg)
    if not image_id:
        found = [ln for ln in lines if ln.startswith("Successfully built ") or len(ln) == 64]
        image_id = found[-1].split()[-1] if found else ""
    if not image_id:
        msg = "worker image build: the engine reported no image id:\n" + "\n".join(lines[-30:])
        raise ImageError(msg)
    return image_id


def build_worker_image(
    docker_host: str,
    tag: str = WORKER_IMAGE,
    *,
    base_image: str | None = None,
    extra_ca: str | None = None,
    root: Path = CHECKOUT,
) -> str:
    """Build worker/Dockerfile through the engine at `docker_host`; the image id.

    Args:
        base_image: BASE_IMAGE build argument (None: the Dockerfile's default).
        extra_ca: PEM bundle trusted by the builder stage only (`local_ca_bundle()`).

    Raises:
        ImageError: the build failed; with the output's tail.
        ToolError: the engine is unreachable.
    """
    context = worker_build_context(root, extra_ca)
    client = engine_client(docker_host)
    try:
        stream = client.api.build(
            fileobj=context,
            custom_context=True,
            dockerfile=WORKER_DOCKERFILE,
            tag=tag,
            buildargs={"BASE_IMAGE": base_image} if base_image else {},
            network_mode="host",
            rm=True,
            forcerm=True,
            decode=True,
        )
        return _image_id(stream)
    except APIError as exc:
        msg = f"engine refused the worker image build: {exc.explanation or exc}"
        raise ImageError(msg) from exc
    except DockerException as exc:
        msg = f"engine connection failed during the worker image build: {exc}"
        raise ToolError(msg) from exc
    finally:
        client.close()

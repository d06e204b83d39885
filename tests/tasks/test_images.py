"""Image builds through the real engine with the shared Dockerfile."""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from pathlib import Path

import docker
import pytest

from blocks.catalog import ServiceSpec
from blocks.config import PipelineConfig
from blocks.stack import StackInfo
from core.errors import ImageError, ToolError
from core.records import ImageRef
from tasks.images import (
    BuiltImage,
    _stream_build,
    build_context,
    build_image,
    image_labels,
    image_repository,
    image_tags,
    local_ca_bundle,
)
from tasks.registry import image_config

REPO = Path(__file__).resolve().parents[2]
PEM = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----"


def test_image_tags_and_labels() -> None:
    assert image_tags("1.2.3", "0123456789abcdef0123") == ["1.2.3", "sha-0123456789ab"]
    labels = image_labels("course", "1.2.3", "abc1234", source="https://git.example/x")
    assert labels["org.opencontainers.image.revision"] == "abc1234"
    assert labels["org.opencontainers.image.version"] == "1.2.3"
    assert labels["org.opencontainers.image.title"] == "course"
    assert labels["org.opencontainers.image.source"] == "https://git.example/x"
    assert re.match(
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", labels["org.opencontainers.image.created"]
    )
    with pytest.raises(ValueError, match="version"):
        image_tags("1.0+build", "abc1234")
    with pytest.raises(ValueError, match="commit"):
        image_tags("1.0", "HEAD")


def test_local_ca_bundle_reads_pem_files(tmp_path: Path) -> None:
    assert local_ca_bundle(tmp_path) is None
    (tmp_path / "corp.crt").write_text(PEM)
    (tmp_path / "notes.txt").write_text("ignored")
    assert local_ca_bundle(tmp_path) == PEM + "\n"


def test_build_context_holds_only_what_the_image_needs(config: PipelineConfig) -> None:
    tar = tarfile.open(fileobj=build_context(REPO, config.service("course"), ["servicekit"], PEM))
    names = tar.getnames()
    assert "services/Dockerfile" in names
    assert "services/course/pyproject.toml" in names
    assert "libs/servicekit/pyproject.toml" in names
    assert not [n for n in names if n.startswith(("services/auth/", "flows/", "libs/authn/"))]
    assert not [n for n in names if "/.venv/" in n or "/tests/" in n or "__pycache__" in n]
    ca = tar.extractfile(".build/extra-ca.crt")
    assert ca is not None
    assert ca.read().decode() == PEM


def test_build_context_leaves_out_environments_and_caches_without_a_dockerignore(
    config: PipelineConfig, tmp_path: Path
) -> None:
    """A checkout whose service was synced and checked, and no .dockerignore: the context
    holds the same source files as with one, never the .venv or the tools' caches."""
    spec = config.service("course")
    shutil.copytree(REPO / "services" / "course", tmp_path / "services" / "course")
    shutil.copytree(REPO / "libs" / "servicekit", tmp_path / "libs" / "servicekit")
    shutil.copy(REPO / "services" / "Dockerfile", tmp_path / "services" / "Dockerfile")
    before = tarfile.open(fileobj=build_context(tmp_path, spec, ["servicekit"], PEM)).getnames()
    service = tmp_path / "services" / "course"
    for noise in (".venv/lib/site.py", ".mypy_cache/3.11/x.json", "src/__pycache__/a.pyc"):
        (service / noise).parent.mkdir(parents=True, exist_ok=True)
        (service / noise).write_text("noise")
    (service / ".coverage").write_text("noise")
    after = tarfile.open(fileobj=build_context(tmp_path, spec, ["servicekit"], PEM)).getnames()
    assert after == before
    assert "services/course/pyproject.toml" in after


def test_bad_arguments_fail_before_any_build(config: PipelineConfig) -> None:
    with pytest.raises(ValueError, match="commit"):
        build_image.fn(
            config.service("course"),
            docker_host="unix:///nonexistent.sock",
            repository="127.0.0.1:1/elice/course",
            version="1.0",
            commit="not-a-sha",
        )
    ghost = ServiceSpec(name="ghost", port=9999)
    with pytest.raises(ValueError, match=r"no pyproject\.toml"):
        build_image.fn(
            ghost,
            docker_host="unix:///nonexistent.sock",
            repository="127.0.0.1:1/elice/ghost",
            version="1.0",
            commit="abc1234",
        )


def test_built_image_carries_tags_and_oci_labels(
    built_image: BuiltImage, docker_client: docker.DockerClient
) -> None:
    image = docker_client.images.get(built_image.references[1])
    assert set(built_image.references) <= set(image.tags)
    labels = image.labels
    assert labels["org.opencontainers.image.revision"] == built_image.commit
    assert labels["org.opencontainers.image.version"] == built_image.version
    assert labels["org.opencontainers.image.title"] == "course"
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert image.attrs["Config"]["User"] == "10001:10001"
    assert "PORT=8000" in image.attrs["Config"]["Env"]


def test_healthcheck_survives_the_build(pushed_image: ImageRef) -> None:
    config = image_config(pushed_image.repository, pushed_image.digest)["config"]
    check = " ".join(config["Healthcheck"]["Test"])
    assert "urllib" in check
    assert "/health" in check


def test_extra_ca_stays_out_of_the_final_image(
    built_image: BuiltImage, docker_client: docker.DockerClient
) -> None:
    bodies = [
        "".join(c.split("-----")[2].split())
        for c in (local_ca_bundle() or "").split("-----END CERTIFICATE-----")
        if "BEGIN" in c
    ]
    script = (
        "import glob, json, os, pathlib; "
        "store = ''.join(pathlib.Path('/etc/ssl/certs/ca-certificates.crt').read_text().split()); "
        "needles = [n for n in os.environ['NEEDLES'].split(',') if n]; "
        "print(json.dumps({'files': glob.glob('/usr/local/share/ca-certificates/*')"
        " + glob.glob('/tmp/ca*'), 'certs': store.count('BEGINCERTIFICATE'),"
        " 'leaked': [n for n in needles if n in store]}))"
    )
    out = docker_client.containers.run(
        built_image.references[0],
        ["python", "-c", script],
        environment={"NEEDLES": ",".join(b[-64:] for b in bodies)},
        remove=True,
        network_mode="none",
    )
    found = json.loads(out.decode().strip().splitlines()[-1])
    assert found["files"] == []
    assert found["leaked"] == []
    assert found["certs"] > 50  # the base's own trust store is intact


def test_build_error_names_the_failing_step(
    stack: StackInfo, config: PipelineConfig, tmp_path: Path
) -> None:
    shutil.copytree(
        REPO / "services" / "course",
        tmp_path / "services" / "course",
        ignore=shutil.ignore_patterns(".venv", "__pycache__", "*cache*", "tests"),
    )
    shutil.copy(REPO / "services" / "Dockerfile", tmp_path / "services" / "Dockerfile")
    shutil.copytree(
        REPO / "libs" / "servicekit",
        tmp_path / "libs" / "servicekit",
        ignore=shutil.ignore_patterns(".venv", "__pycache__", "*cache*", "tests"),
    )
    (tmp_path / "services" / "course" / "pyproject.toml").write_text("[project\nname = broken\n")
    with pytest.raises(ImageError) as caught:
        build_image.fn(
            config.service("course"),
            docker_host=stack.docker_host,
            repository=image_repository(stack.registry, "elice-broken", "course"),
            version="0.0.1",
            commit="abc1234",
            base_image=stack.base_image,
            extra_ca=local_ca_bundle(),
            root=tmp_path,
        )
    message = str(caught.value)
    assert re.search(r"image build failed at .*STEP \d+/\d+: RUN set -e;", message.splitlines()[0])
    assert "pyproject.toml" in message


def test_an_image_store_changed_under_the_build_is_built_again() -> None:
    """Seen under four test workers on one engine: Podman's build cache lookup met an image
    another client removed at that moment. That is no failure of the build: a ToolError,
    which `build_image` retries; a failing Dockerfile step stays an ImageError."""
    race = (
        "checking if cached image exists from a previous build: "
        "getting top layer info: layer not known"
    )
    stream = [
        {"stream": "STEP 1/9: FROM base\n"},
        {"error": race, "errorDetail": {"message": race}},
    ]
    with pytest.raises(ToolError, match="the engine's image store changed during the build"):
        _stream_build(iter(stream), "course")
    failed = [{"stream": "STEP 4/9: RUN uv sync\n"}, {"error": "exit status 1"}]
    with pytest.raises(ImageError, match="STEP 4/9"):
        _stream_build(iter(failed), "course")
    assert build_image.retry_condition_fn is not None
    assert build_image.retries >= 1

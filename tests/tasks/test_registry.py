"""Push to and read from a real OCI registry (docker-registry) through the real engine."""

from __future__ import annotations

import pytest

from blocks.registry import OciRegistry
from core.errors import ImageError, ToolError
from core.records import ImageRef
from tasks.images import BuiltImage, push_image
from tasks.registry import copy_tag, image_exists, manifest_digest, read_labels, split_repository

UNKNOWN = "sha256:" + "0" * 64


def test_split_repository() -> None:
    assert split_repository("127.0.0.1:5000/elice/course") == ("127.0.0.1:5000", "elice/course")
    with pytest.raises(ValueError, match="host"):
        split_repository("course")
    with pytest.raises(ValueError):
        OciRegistry(address="http://127.0.0.1:5000")


def test_push_reads_the_digest_back(pushed_image: ImageRef, built_image: BuiltImage) -> None:
    assert pushed_image.repository == built_image.repository
    for tag in built_image.tags:
        assert manifest_digest(pushed_image.repository, tag) == pushed_image.digest
    assert image_exists(pushed_image.repository, pushed_image.digest)
    assert pushed_image.commit == built_image.commit


def test_labels_are_read_from_the_registry(pushed_image: ImageRef) -> None:
    labels = read_labels(pushed_image.repository, pushed_image.digest)
    assert labels["org.opencontainers.image.revision"] == pushed_image.commit
    assert labels["org.opencontainers.image.version"] == pushed_image.version


def test_copy_tag_keeps_the_digest(pushed_image: ImageRef, oci_registry: OciRegistry) -> None:
    new_tag = f"staging-{pushed_image.short}"
    assert copy_tag.fn(pushed_image.repository, pushed_image.digest, new_tag, oci_registry) == (
        pushed_image.digest
    )
    assert manifest_digest(pushed_image.repository, new_tag, oci_registry) == pushed_image.digest


def test_unknown_digest(pushed_image: ImageRef) -> None:
    assert image_exists(pushed_image.repository, UNKNOWN) is False
    with pytest.raises(ImageError, match="manifest not found"):
        copy_tag.fn(pushed_image.repository, UNKNOWN, "nope")
    with pytest.raises(ImageError, match="no manifest digest"):
        manifest_digest(pushed_image.repository, "no-such-tag")


def test_unreachable_engine_and_registry_are_tool_errors(built_image: BuiltImage) -> None:
    with pytest.raises(ToolError, match="does not answer"):
        push_image.fn(built_image, docker_host="unix:///nonexistent/engine.sock")
    with pytest.raises(ToolError, match="unreachable"):
        image_exists("127.0.0.1:9/elice/course", UNKNOWN)

"""A registry blip is a blip: 5xx, 429, a refused or dropped connection in front of a real
registry are retryable ToolErrors, never "not found" or a refused promotion."""

from __future__ import annotations

import dataclasses

import pytest

from core.errors import RegistryError, ToolError
from core.records import ImageRef
from tasks.registry import fetch_manifest, image_exists, verify_release_image
from tests.plugins.faults import Fault, FaultProxy
from tests.plugins.registries import AuthRegistry

DIGEST = "sha256:" + "ab" * 32


def _through(proxy: FaultProxy, registry: AuthRegistry) -> tuple[str, object]:
    block = registry.block.model_copy(update={"address": proxy.address})
    return f"{proxy.address}/elice/course", block


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (Fault("status", status=503), "unavailable .* \\(HTTP 503\\)"),
        (Fault("status", status=500), "unavailable .* \\(HTTP 500\\)"),
        (Fault("status", status=429, retry_after=3), "HTTP 429, retry after 3s"),
        (Fault("refuse"), "unreachable"),
        (Fault("drop", after_bytes=20), "unreachable"),
    ],
)
def test_a_registry_fault_is_a_tool_error_then_the_real_answer_comes_back(
    basic_registry: AuthRegistry,
    fault_proxy: type[FaultProxy],
    fault: Fault,
    message: str,
) -> None:
    proxy = fault_proxy(basic_registry.address)
    repository, block = _through(proxy, basic_registry)
    proxy.inject(dataclasses.replace(fault, path="/manifests/", times=None))
    with pytest.raises(ToolError, match=message):
        image_exists(repository, DIGEST, block)  # type: ignore[arg-type]
    with pytest.raises(ToolError, match=message):
        fetch_manifest(repository, "0.1.0", block)  # type: ignore[arg-type]
    proxy.clear()
    assert image_exists(repository, DIGEST, block) is False  # type: ignore[arg-type]
    with pytest.raises(RegistryError, match="manifest not found \\(HTTP 404\\)"):
        fetch_manifest(repository, "0.1.0", block)  # type: ignore[arg-type]
    assert any(verdict != "pass" for _, _, verdict in proxy.requests)


def test_a_registry_outage_during_verification_is_retried_not_a_refusal(
    basic_registry: AuthRegistry, fault_proxy: type[FaultProxy]
) -> None:
    proxy = fault_proxy(basic_registry.address)
    repository, block = _through(proxy, basic_registry)
    proxy.inject(Fault("status", path="/manifests/", status=503, times=None))
    image = ImageRef(service="course", repository=repository, digest=DIGEST, commit="c" * 40)
    with pytest.raises(ToolError, match="HTTP 503"):
        verify_release_image.fn(image, block)  # type: ignore[arg-type]

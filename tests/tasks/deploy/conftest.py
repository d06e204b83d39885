"""The deploy targets are driven directly (the docker engine, the Kubernetes simulator):
no Prefect server is needed, so the session one is not started for them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.plugins.kube import KubeCluster


@pytest.fixture(scope="session", autouse=True)
def prefect_server() -> None:
    """Overrides tests/conftest.py's server: tasks here run through `.fn`, outside Prefect."""
    return


@pytest.fixture
def kubelet_marks(kube: KubeCluster) -> Iterator[dict[str, str]]:
    """The real control plane's stand-in kubelet's broken images, cleared after the test."""
    assert kube.kubelet is not None
    yield kube.kubelet.broken
    kube.kubelet.broken.clear()

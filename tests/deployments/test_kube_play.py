"""The rendered dev manifests run: `podman kube play` of the `course` Deployment.

The dev overlay is rendered by `render_overlay` with the real `course` image (built and
pushed to the local registry by the `pushed_image` fixture) pinned by digest; the
service's Deployment and the ConfigMaps it reads (`service_objects`) are played as real
pods by the stack's own engine (`podman --url <stack.docker_host> kube play`, so the
engine's containers.conf infra image and registries.conf apply).

Adaptations from the rendered manifest to `podman kube play` on this machine:
- only the Deployment and the two ConfigMaps it reads (`elice-environment-<hash>`,
  `course`) are played; Namespace, ServiceAccount, Service and HPA have no kube-play
  meaning (no API server, no scheduler, no cluster DNS);
- `metadata.name` gets a unique suffix and the pod template a unique
  `elice.io/kube-play-test` label, so concurrent runs never collide and the pod is found
  by label;
- `spec.replicas: 1` (the manifest has none: the HPA owns it in a cluster);
- `hostNetwork: true` and `PORT` set to a free loopback port: there is no pod network
  here and all traffic stays on the host's loopback;
- container `ports` dropped: podman rejects port mappings with host networking;
- `livenessProbe`/`readinessProbe` dropped: podman turns httpGet probes into a
  `curl -f http://localhost:<port>/...` healthcheck run inside the container (the image
  has no curl, the named port `http` resolves to 0) scheduled by systemd timers, which do
  not exist here; the test probes /health itself instead;
- `imagePullPolicy: Always` (was IfNotPresent): podman resolves the pinned
  `127.0.0.1:PORT/elice/course@sha256:...` against the local registry instead of the copy
  the build left in storage. The reference itself is unchanged: the engine's
  registries.conf marks the local registry insecure;
- the emptyDir volume `tmp` is renamed uniquely: podman 4 backs an emptyDir with a named
  volume of the same name, shared by every pod on the engine otherwise.
Nothing else changes: env (IMAGE_DIGEST, ...), envFrom, uid/gid 10001, read-only root
filesystem, dropped capabilities, no privilege escalation and the cpu/memory limits are
played as rendered. No downward-API env is rendered, so none needs substituting.
"""

from __future__ import annotations

import copy
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from blocks.stack import StackInfo
from core.records import ImageRef
from stack.ports import free_port
from tasks.deploy.kubernetes import APP_CONTAINER
from tasks.deploy.manifests import render_overlay, service_objects

DEPLOYMENTS = Path(__file__).resolve().parents[2] / "deployments"
SERVICE = "course"
ANSWER_DEADLINE_S = 120.0
TEST_LABEL = "elice.io/kube-play-test"


@dataclass(frozen=True)
class PlayedPod:
    """What `podman kube play` started, and the manifest it played."""

    rendered_deployment: dict[str, Any]
    played: list[dict[str, Any]]
    port: int
    pod: dict[str, Any]
    base_url: str


def _podman(stack: StackInfo, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", "--url", stack.docker_host, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def adapt_for_kube_play(
    objects: list[dict[str, Any]], *, token: str, port: int
) -> list[dict[str, Any]]:
    """The service's Deployment and ConfigMaps, adapted as the module docstring lists."""
    played = [copy.deepcopy(o) for o in objects if o["kind"] in {"ConfigMap", "Deployment"}]
    deployment = next(o for o in played if o["kind"] == "Deployment")
    deployment["metadata"]["name"] = f"{SERVICE}-kp-{token}"
    deployment["spec"]["replicas"] = 1
    template = deployment["spec"]["template"]
    template["metadata"]["labels"][TEST_LABEL] = token
    pod = template["spec"]
    pod["hostNetwork"] = True
    volume_names = {}
    for volume in pod.get("volumes", []):
        volume_names[volume["name"]] = f"{volume['name']}-kp-{token}"
        volume["name"] = volume_names[volume["name"]]
    for container in pod["containers"]:
        container.pop("ports", None)
        container.pop("livenessProbe", None)
        container.pop("readinessProbe", None)
        container["imagePullPolicy"] = "Always"
        for item in container.get("env", []):
            if item["name"] == "PORT":
                item["value"] = str(port)
        for mount in container.get("volumeMounts", []):
            mount["name"] = volume_names[mount["name"]]
    return played


def _pod_by_label(stack: StackInfo, token: str) -> list[dict[str, Any]]:
    done = _podman(
        stack, "pod", "ps", "--filter", f"label={TEST_LABEL}={token}", "--format", "json"
    )
    assert done.returncode == 0, done.stderr
    pods: list[dict[str, Any]] = json.loads(done.stdout or "[]")
    return pods


@pytest.fixture
def played_pod(stack: StackInfo, pushed_image: ImageRef, tmp_path: Path) -> Iterator[PlayedPod]:
    """The `course` Deployment of the dev overlay, played by podman; removed afterwards."""
    assert stack.pause_image, "the stack prepared no infra (pause) image for kube play"
    rendered = service_objects(
        render_overlay("dev", {SERVICE: pushed_image}, deployments_dir=DEPLOYMENTS), SERVICE
    )
    rendered_deployment = next(o for o in rendered if o["kind"] == "Deployment")
    token = uuid.uuid4().hex[:10]
    port = free_port()
    played = adapt_for_kube_play(rendered, token=token, port=port)
    played_deployment = next(o for o in played if o["kind"] == "Deployment")
    manifest = tmp_path / "course-kube-play.yaml"
    manifest.write_text(yaml.safe_dump_all(played, sort_keys=False), encoding="utf-8")
    try:
        done = _podman(stack, "kube", "play", str(manifest))
        assert done.returncode == 0, f"kube play failed:\n{done.stdout}\n{done.stderr}"
        pods = _pod_by_label(stack, token)
        assert len(pods) == 1, pods
        yield PlayedPod(
            rendered_deployment=rendered_deployment,
            played=played,
            port=port,
            pod=pods[0],
            base_url=f"http://127.0.0.1:{port}",
        )
    finally:
        down = _podman(stack, "kube", "down", str(manifest))
        for pod in _pod_by_label(stack, token):  # kube down failed or left something
            _podman(stack, "pod", "rm", "--force", pod["Id"])
        for volume in played_deployment["spec"]["template"]["spec"].get("volumes", []):
            _podman(stack, "volume", "rm", "--force", volume["name"])
        assert not _pod_by_label(stack, token), f"pod left behind; kube down: {down.stderr}"


def _app_container(stack: StackInfo, pod: dict[str, Any]) -> dict[str, Any]:
    name = next(c["Names"] for c in pod["Containers"] if c["Names"].endswith(f"-{APP_CONTAINER}"))
    done = _podman(stack, "container", "inspect", name)
    assert done.returncode == 0, done.stderr
    inspected: list[dict[str, Any]] = json.loads(done.stdout)
    return inspected[0]


def _wait_for_health(stack: StackInfo, played: PlayedPod) -> httpx.Response:
    """GET /health until it answers (the app container must stay up meanwhile)."""
    deadline = time.monotonic() + ANSWER_DEADLINE_S
    last: str = "no attempt"
    with httpx.Client(timeout=5, trust_env=False) as client:
        while time.monotonic() < deadline:
            try:
                return client.get(f"{played.base_url}/health")
            except httpx.HTTPError as exc:
                last = repr(exc)
            state = _app_container(stack, played.pod)["State"]
            if state.get("Status") not in {"created", "configured", "initialized", "running"}:
                logs = _podman(stack, "logs", _app_container(stack, played.pod)["Id"])
                pytest.fail(f"app container is {state}; logs:\n{logs.stdout}{logs.stderr}")
            time.sleep(1)
    pytest.fail(f"{played.base_url}/health did not answer in {ANSWER_DEADLINE_S:.0f}s: {last}")


def test_kube_play_runs_the_pinned_dev_deployment(
    stack: StackInfo, pushed_image: ImageRef, played_pod: PlayedPod
) -> None:
    rendered_app = next(
        c
        for c in played_pod.rendered_deployment["spec"]["template"]["spec"]["containers"]
        if c["name"] == APP_CONTAINER
    )
    # the rendered manifest pins the pushed image and says so in IMAGE_DIGEST
    assert rendered_app["image"] == pushed_image.reference
    pinned_digest = _env(rendered_app)["IMAGE_DIGEST"]
    assert pinned_digest == pushed_image.digest

    health = _wait_for_health(stack, played_pod)
    assert health.status_code == 200, health.text
    assert health.json() == {"status": "ok", "service": SERVICE}

    with httpx.Client(timeout=10, trust_env=False) as client:
        version = client.get(f"{played_pod.base_url}/version")
    assert version.status_code == 200, version.text
    body = version.json()
    assert body["digest"] == pinned_digest
    assert body["service"] == SERVICE
    assert body["version"] == _env(rendered_app)["APP_VERSION"] == pushed_image.version
    assert body["commit"] == pushed_image.commit
    # ENVIRONMENT comes from the overlay's elice-environment ConfigMap through envFrom
    assert body["environment"] == "dev"

    # a real pod: the stack's infra (pause) image plus the app container, both running
    pod = _pod_by_label(stack, played_pod.pod["Labels"][TEST_LABEL])[0]
    assert pod["Status"] == "Running", pod
    states = {c["Names"]: c["Status"] for c in pod["Containers"]}
    assert sorted(states.values()) == ["running", "running"], states
    inspect = _podman(stack, "pod", "inspect", pod["Id"])
    assert inspect.returncode == 0, inspect.stderr
    infra_id = json.loads(inspect.stdout)["InfraContainerID"]
    infra = json.loads(_podman(stack, "container", "inspect", infra_id).stdout)[0]
    assert infra["ImageName"] == stack.pause_image

    # the app runs the pinned image with the rendered security context and limits
    app = _app_container(stack, pod)
    assert app["ImageName"] == pushed_image.reference
    assert app["Config"]["User"] == "10001:10001"
    assert app["HostConfig"]["ReadonlyRootfs"] is True
    assert "CAP_NET_BIND_SERVICE" in app["HostConfig"]["CapDrop"]
    assert app["HostConfig"]["Memory"] == 256 * 1024 * 1024
    assert app["HostConfig"]["NetworkMode"] == "host"

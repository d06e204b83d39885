"""Promotion of N services: one after another against waves of the machine's cores, and
how long a release whose containers exit takes to be rolled back.

    uv run python bench/promotion_bench.py [N] [PAIRS]

Runs in one process against a temporary Prefect server and the user's local stack
(started or reused: `ensure_stack`; ledger and Prefect home are the bench's own). One
real service image is built and pushed once; it stands in for each of the N services
(a service is its port and variables, the image is shared),
deployed and recorded as verified in the source environment `pb-dev`. Each run then
promotes all N into a fresh target environment (its containers removed first, so every
service deploys): `ELICE_DEPLOY_WAVE=1` (one after another, the flow before waves) and
the default (waves of the cores), alternated, PAIRS pairs; medians and their ratio.

Then the fail-fast drill: a second release whose containers exit at once (HOST names an
address the machine does not have) is promoted into an environment serving the first,
with a 60 s health deadline: printed is the time from the start of the promotion until
the flow has put every service back (the flow's end), and the flow's own deploy time.
Compare within one run only.
"""

from __future__ import annotations

import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_SCRATCH = Path(tempfile.mkdtemp(prefix="promotion-bench-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", str(_SCRATCH / "prefect-home"))
# The user's local stack (engine, registry), reused; only the ledger and Prefect's home
# are the bench's own. Without this the stack would follow the state dir into scratch
# and start an engine per run that outlives it.
os.environ.setdefault("ELICE_STACK_DIR", os.environ.get("ELICE_STATE_DIR") or str(ROOT / ".elice"))
os.environ.setdefault("ELICE_STATE_DIR", str(_SCRATCH / "state"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import docker  # noqa: E402
import yaml  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from blocks.config import PipelineConfig, load_config  # noqa: E402
from blocks.registry import OciRegistry  # noqa: E402
from blocks.stack import StackInfo  # noqa: E402
from blocks.storage import ledger_filesystem  # noqa: E402
from core.records import ImageRef  # noqa: E402
from core.settings import Settings  # noqa: E402
from flows.promotion import promote  # noqa: E402
from stack.control import ensure_stack  # noqa: E402
from tasks.deploy.docker import DockerDeployer, container_name  # noqa: E402
from tasks.images import build_image, image_repository, local_ca_bundle, push_image  # noqa: E402
from tasks.registry import manifest_digest  # noqa: E402
from tasks.releases import Ledger, ReleaseRecord  # noqa: E402

SOURCE = "pb-dev"
TARGETS = ("pb-seq", "pb-wave", "pb-fail")


def write_config(services: list[tuple[str, int]]) -> str:
    """The first N services of the catalog and the bench's environments."""

    def env(name: str, offset: int, source: str | None) -> dict[str, object]:
        data: dict[str, object] = {
            "name": name,
            "namespace": name,
            "replicas": {"min": 1, "max": 1},
            "log_level": "INFO",
            "storage": "minio",
            "local_port_offset": offset,
        }
        if source:
            data["promotes_from"] = source
        return data

    data = {
        "services": [{"name": n, "port": p, "libs": ["servicekit"]} for n, p in services],
        "libs": [{"name": "servicekit", "libs": []}],
        "environments": [
            env(SOURCE, 14000, None),
            *(env(name, 15000 + 1000 * i, SOURCE) for i, name in enumerate(TARGETS)),
        ],
        "performance": {"requests": 8, "concurrency": 4, "min_p95_slack_ms": 500},
    }
    path = _SCRATCH / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def image(host: str, registry: OciRegistry, base: str | None) -> ImageRef:
    """One real image (of `course`, as the tests use), built and pushed once."""
    token = uuid.uuid4().hex
    service = load_config().service("course")
    built = build_image.fn(
        service,
        docker_host=host,
        repository=image_repository(registry.address, registry.namespace, service.name),
        version=f"0.1.0-b{token[:8]}",
        commit=token,
        base_image=base,
        source="https://example.invalid/elice/monorepo",
        extra_ca=local_ca_bundle(),
    )
    return push_image.fn(built, docker_host=host, registry=registry)


def variant(client: docker.DockerClient, base: ImageRef) -> ImageRef:
    """A second release: the same image plus a label, pushed."""
    tag = f"bench-{base.short}"
    client.images.build(
        fileobj=io.BytesIO(f"FROM {base.reference}\nLABEL io.elice.bench=1\n".encode()),
        tag=f"{base.repository}:{tag}",
    )
    for chunk in client.api.push(base.repository, tag=tag, stream=True, decode=True):
        if "error" in chunk:
            raise RuntimeError(chunk["error"])
    return base.model_copy(update={"digest": manifest_digest(base.repository, tag), "tag": tag})


def seed(cfg: PipelineConfig, env: str, release: ImageRef) -> None:
    """Deploy `release` as every service of `env` and record it as verified there."""
    deployer = DockerDeployer()
    for spec in cfg.catalog.services:
        ref = release.model_copy(update={"service": spec.name})
        deployer.deploy(cfg.environment(env), spec, ref, deadline_s=120)
        Ledger(ledger_filesystem(Settings.from_environ())).record_deploy(
            env,
            ReleaseRecord(
                service=spec.name,
                environment=env,
                image=ref,
                release_id=f"bench-{release.short}",
                verified=True,
                ref="refs/heads/main",
                scan="clean",
            ),
        )
        Ledger(ledger_filesystem(Settings.from_environ())).mark_verified(env, spec.name, None)


def clear(client: docker.DockerClient, cfg: PipelineConfig, env: str) -> None:
    for spec in cfg.catalog.services:
        for suffix in ("", "-next"):
            with contextlib.suppress(docker.errors.NotFound):
                client.containers.get(container_name("elice", env, spec.name) + suffix).remove(
                    force=True
                )


def run(cfg_path: str, env: str, wave: str | None, **extra: object) -> tuple[float, str]:
    if wave is None:
        os.environ.pop("ELICE_DEPLOY_WAVE", None)
    else:
        os.environ["ELICE_DEPLOY_WAVE"] = wave
    started = time.perf_counter()
    state = promote(
        environment=env, config_source=cfg_path, promoted_by="bench", return_state=True, **extra
    )
    return time.perf_counter() - started, f"{state.type.value}: {(state.message or '')[:70]}"


class Setup(NamedTuple):
    cfg_path: str
    cfg: PipelineConfig
    stack: StackInfo
    client: docker.DockerClient
    registry: OciRegistry


def set_up(count: int, write: Callable[[list[tuple[str, int]]], str]) -> Setup:
    """The first `count` services' configuration (written by `write`), the local stack,
    an engine client and the stack's registry; DOCKER_HOST points at the stack's engine."""
    catalog = load_config().catalog.services[:count]
    cfg_path = write([(s.name, s.port) for s in catalog])
    stack = ensure_stack()
    os.environ["DOCKER_HOST"] = stack.docker_host
    client = docker.DockerClient(base_url=stack.docker_host, timeout=600)
    registry = OciRegistry(address=stack.registry, insecure=True)
    return Setup(cfg_path, load_config(cfg_path), stack, client, registry)


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    pairs = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    cfg_path, cfg, stack, client, registry = set_up(count, write_config)
    print(f"{count} services, {os.cpu_count()} cores, {pairs} pairs")
    try:
        with prefect_test_harness(server_startup_timeout=300):
            first = image(stack.docker_host, registry, stack.base_image)
            for env in (SOURCE, *TARGETS):
                clear(client, cfg, env)
            seed(cfg, SOURCE, first)
            times: dict[str, list[float]] = {"one after another": [], "waves of the cores": []}
            for _ in range(pairs):
                for label, env, wave in (
                    ("one after another", "pb-seq", "1"),
                    ("waves of the cores", "pb-wave", None),
                ):
                    clear(client, cfg, env)
                    seconds, outcome = run(cfg_path, env, wave)
                    times[label].append(seconds)
                    print(f"  {label:<20} {seconds:6.1f}s  {outcome}")
            base = statistics.median(times["one after another"])
            for label, values in times.items():
                median = statistics.median(values)
                print(f"{label:<20} median {median:6.1f}s  ratio {median / base:.2f}")

            # fail fast: pb-fail serves the first release; the second one exits at once
            clear(client, cfg, "pb-fail")
            run(cfg_path, "pb-fail", None)
            broken = variant(client, first)
            seed(cfg, SOURCE, broken)
            seconds, outcome = run(
                cfg_path,
                "pb-fail",
                None,
                drill_env={broken.digest: {"HOST": "203.0.113.1"}},
                health_deadline_s=60,
            )
            print(f"exiting release, {count} services: rolled back in {seconds:.1f}s ({outcome})")
    finally:  # the engine outlives this process: leave no container behind
        for env in (SOURCE, *TARGETS):
            clear(client, cfg, env)
    client.close()


if __name__ == "__main__":
    main()

"""A cold full CI of N services: the CI flow against a hand-written `make -j2` of the same
commands, image build, push, SBOM, deploy and health check included.

    uv run python bench/cold_bench.py [N] [PAIRS]

Cold means: a fresh git copy of the monorepo each run (no service environments, no tool
caches, no pipeline cache) and no build cache in the engine (the bench's images and the
engine's dangling build layers are removed before each run; the stack's base image
stays, as on any machine whose stack is up). uv's download cache stays warm: these
machines cannot fetch every wheel again.

The baseline is a Makefile, one target per service, generated from the same command
builders the flow's stages use (`bench/quality_bench.service_commands`: lock, export,
sync, ruff, mypy, bandit, pytest; pip-audit's arguments; `syft_registry_env`), then the
engine calls the flow makes through docker-py, written as `curl` requests to the same
Docker API: build (the context the flow builds, `build_context`, written to a file
beforehand), tag, push of both tags, the digest read back from the registry, syft's
SBOM, container create + start with the variables the flow's deployer gives
(`container_env`), and polling `/health`. The flow is `ci` in this process
(`--no-cache`, delivery to the bench's own environment) against a temporary Prefect
server. The local stack's start-up is timed apart (zero when it already runs). Runs
alternate (make, flow, flow, make, ...); medians and the ratio. Compare within one run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import urllib.parse
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The user's local stack is reused: fix its home before the scratch state dir is set.
os.environ.setdefault("ELICE_STACK_DIR", os.environ.get("ELICE_STATE_DIR") or str(ROOT / ".elice"))

import docker  # noqa: E402
import yaml  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from bench.ci_bench import _SCRATCH, checkout  # noqa: E402
from bench.quality_bench import WORKERS, service_target  # noqa: E402
from bench.timeline import (  # noqa: E402
    children,
    cpu_watch,
    flow_spans,
    make_spans,
    report,
    timed,
)
from blocks.catalog import ServiceSpec  # noqa: E402
from blocks.config import PipelineConfig, load_config  # noqa: E402
from blocks.environments import EnvironmentSpec  # noqa: E402
from blocks.registry import OciRegistry  # noqa: E402
from core.records import ImageRef  # noqa: E402
from flows.ci import bounded_runner, ci  # noqa: E402
from stack.control import ensure_stack  # noqa: E402
from tasks.deploy.docker import container_env, container_name  # noqa: E402
from tasks.images import (  # noqa: E402
    DOCKERFILE,
    build_context,
    image_labels,
    image_repository,
    local_ca_bundle,
)
from tasks.process import which  # noqa: E402
from tasks.security import pip_audit_command, syft_registry_env  # noqa: E402

ENV = "cb-dev"
PREFIXES = ("elice", "make")
API = "http://engine/v1.41"


def write_config(names: list[str]) -> str:
    catalog = load_config().catalog
    data = {
        "services": [
            {"name": s.name, "port": s.port, "libs": list(s.libs)} for s in catalog.select(names)
        ],
        "libs": [{"name": lib.name, "libs": list(lib.libs)} for lib in catalog.libs],
        "environments": [
            {
                "name": ENV,
                "namespace": ENV,
                "replicas": {"min": 1, "max": 1},
                "log_level": "INFO",
                "storage": "minio",
                "local_port_offset": 20000,
            }
        ],
    }
    path = _SCRATCH / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def fresh_checkout(names: list[str], cfg_path: str) -> Path:
    """A new git copy of the monorepo with the bench's configuration."""
    return checkout(names, _SCRATCH / f"repo-{uuid.uuid4().hex[:8]}", cfg_path)


def _q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _curl(*args: str) -> str:
    return shlex.join(["curl", "-sS", "--fail", *args])


def engine_lines(
    repo: Path,
    spec: ServiceSpec,
    env: EnvironmentSpec,
    registry: OciRegistry,
    socket: str,
    base_image: str | None,
) -> list[str]:
    """Build, tag, push both tags, read the digest, SBOM, deploy, health: as shell lines."""
    scratch = _SCRATCH / "make" / spec.name
    scratch.mkdir(parents=True, exist_ok=True)
    repository = image_repository(registry.address, registry.namespace, spec.name)
    version, tag2 = f"0.1.0-m{uuid.uuid4().hex[:8]}", f"sha-{uuid.uuid4().hex[:12]}"
    context = scratch / "context.tar"
    context.write_bytes(build_context(repo, spec, list(spec.libs), local_ca_bundle()).getvalue())
    buildargs = {"SERVICE": spec.name, "PACKAGE": spec.package, "LIBS": " ".join(spec.libs)}
    if base_image:
        buildargs["BASE_IMAGE"] = base_image
    labels = image_labels(spec.name, version, "0" * 40)
    build = (
        f"{API}/build?t={_q(f'{repository}:{version}')}&dockerfile={_q(DOCKERFILE)}"
        f"&buildargs={_q(json.dumps(buildargs))}&labels={_q(json.dumps(labels))}"
        "&networkmode=host&rm=1&forcerm=1"
    )
    log = scratch / "engine.log"
    unix = ["--unix-socket", socket]
    no_error = f"! grep -q '\"error' {shlex.quote(str(log))}"
    image = ImageRef(
        service=spec.name,
        repository=repository,
        digest="sha256:" + "0" * 64,
        tag=version,
        version=version,
        commit="0" * 40,
    )
    name = container_name("make", env.name, spec.name)
    create = scratch / "create.json"
    create.write_text(
        json.dumps(
            {
                "Image": f"{repository}:{version}",
                "Env": [f"{k}={v}" for k, v in container_env(env, spec, image, {}).items()],
                "HostConfig": {"NetworkMode": "host"},
            }
        ),
        encoding="utf-8",
    )
    path = repository.split("/", 1)[1]
    accept = "application/vnd.oci.image.manifest.v1+json"
    syft = [
        "env",
        *(f"{k}={v}" for k, v in syft_registry_env(registry).items()),
        which("syft"),
        "scan",
        f"registry:{repository}:{version}",
        "-q",
        "-o",
        f"spdx-json={scratch / 'sbom.json'}",
    ]
    health = f"http://127.0.0.1:{env.host_port(spec.port)}/health"
    return [
        _curl(*unix, "-X", "POST", "-H", "Content-Type: application/x-tar")
        + f" --data-binary @{shlex.quote(str(context))} {shlex.quote(build)}"
        + f" > {shlex.quote(str(log))} && {no_error}",
        _curl(
            *unix,
            "-X",
            "POST",
            f"{API}/images/{repository}:{version}/tag?repo={_q(repository)}&tag={tag2}",
        ),
        *(
            _curl(*unix, "-X", "POST", "-H", "X-Registry-Auth: e30=")
            + f" {shlex.quote(f'{API}/images/{repository}/push?tag={tag}')}"
            + f" > {shlex.quote(str(log))} && {no_error}"
            for tag in (version, tag2)
        ),
        _curl(
            "-I",
            "-H",
            f"Accept: {accept}",
            f"http://{registry.address}/v2/{path}/manifests/{version}",
        )
        + " | grep -qi docker-content-digest",
        shlex.join(syft),
        shlex.join(["curl", "-s", *unix, "-o", "/dev/null", "-X", "DELETE"])
        + f" {shlex.quote(f'{API}/containers/{name}?force=1')}",
        _curl(
            *unix,
            "-o",
            "/dev/null",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            f"@{create}",
            f"{API}/containers/create?name={name}",
        ),
        _curl(*unix, "-o", "/dev/null", "-X", "POST", f"{API}/containers/{name}/start"),
        (
            f"for i in $$(seq 300); do curl -sf -o /dev/null {health} && exit 0; sleep 0.2; done;"
            " exit 1"
        ),
    ]


def makefile(
    repo: Path, cfg: PipelineConfig, registry: OciRegistry, socket: str, base: str | None
) -> tuple[Path, Path]:
    """One target per service: the flow's stage commands, then the engine calls; and
    the file each command's phase and times are appended to."""
    env = cfg.environment(ENV)
    specs = cfg.catalog.services
    log = _SCRATCH / "make-times.txt"
    log.write_text("", encoding="utf-8")
    lines = [
        f"all: {' '.join(s.name for s in specs)}",
        ".PHONY: all " + " ".join(s.name for s in specs),
    ]
    for spec in specs:
        target = service_target(repo, spec, cfg.catalog)
        audit = pip_audit_command(repo / spec.path / "requirements.lock")
        target.append(f"\t-@cd {shlex.quote(str(repo))} && {shlex.join(audit)} > /dev/null 2>&1")
        target.extend(
            f"\t@{line}" for line in engine_lines(repo, spec, env, registry, socket, base)
        )
        lines.append(target[0])
        lines.extend(timed(recipe, spec.name, log) for recipe in target[1:])
    out = _SCRATCH / "Makefile"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out, log


def make_cold(client: docker.DockerClient, cfg: PipelineConfig, registry: OciRegistry) -> None:
    """No bench container, none of the bench's images, no dangling build layer."""
    for spec in cfg.catalog.services:
        for prefix in PREFIXES:
            for suffix in ("", "-next"):
                with contextlib.suppress(docker.errors.NotFound):
                    client.containers.get(container_name(prefix, ENV, spec.name) + suffix).remove(
                        force=True
                    )
        repository = image_repository(registry.address, registry.namespace, spec.name)
        for image in client.images.list(name=repository):
            client.images.remove(image.id, force=True)
    client.images.prune(filters={"dangling": True})


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    pairs = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    started = time.perf_counter()
    stack = ensure_stack()
    stack_s = time.perf_counter() - started
    os.environ["DOCKER_HOST"] = stack.docker_host
    socket = stack.docker_host.removeprefix("unix://")
    client = docker.DockerClient(base_url=stack.docker_host, timeout=600)
    registry = OciRegistry(address=stack.registry, insecure=True)
    names = load_config().catalog.names()[:count]
    cfg_path = write_config(names)
    cfg = load_config(cfg_path)
    print(f"cold full CI of {len(names)} services, {os.cpu_count()} cores, {pairs} pairs")
    print(f"local stack start-up (apart): {stack_s:.1f}s")

    def run_make() -> float:
        shutil.rmtree(_SCRATCH / "make", ignore_errors=True)  # its mypy caches: cold each run
        repo = fresh_checkout(names, cfg_path)
        make, log = makefile(repo, cfg, registry, socket, stack.base_image)
        make_cold(client, cfg, registry)
        with cpu_watch(watched):
            begun, epoch = time.perf_counter(), time.time()
            subprocess.run(["make", "-s", f"-j{WORKERS}", "-f", str(make)], check=True)
            seconds = time.perf_counter() - begun
        report("make -j2", make_spans(log, epoch), seconds)
        return seconds

    def run_flow() -> float:
        repo = fresh_checkout(names, cfg_path)
        make_cold(client, cfg, registry)
        flow = ci.with_options(task_runner=bounded_runner(WORKERS))
        with cpu_watch(watched):
            begun, epoch = time.perf_counter(), time.time()
            state = flow(
                services=names,
                repo=str(repo),
                no_cache=True,
                deliver=True,
                environment=ENV,
                config_source=cfg_path,
                return_state=True,
            )
            seconds = time.perf_counter() - begun
        if not state.is_completed():
            msg = f"the flow did not pass: {(state.message or '')[:400]}"
            raise SystemExit(msg)
        report("flow", flow_spans(state.state_details.flow_run_id, epoch), seconds)
        return seconds

    times: dict[str, list[float]] = {"make -j2": [], "flow": []}
    variants = {"make -j2": run_make, "flow": run_flow}
    try:
        with prefect_test_harness(server_startup_timeout=180):
            # the bench's own process (the flow, its threads) and the Prefect server
            watched = {"this process": os.getpid()}
            watched.update(
                ("Prefect server", pid)
                for pid in children(os.getpid())
                if b"uvicorn" in Path(f"/proc/{pid}/cmdline").read_bytes()
            )
            for pair in range(pairs):
                order = list(variants) if pair % 2 == 0 else list(reversed(variants))
                for label in order:
                    seconds = variants[label]()
                    times[label].append(seconds)
                    print(f"  {label:<10} {seconds:6.1f}s", flush=True)
    finally:
        make_cold(client, cfg, registry)
        client.close()
    base = statistics.median(times["make -j2"])
    print(f"\n{'variant':<10} {'median':>8} {'vs make -j2':>12}")
    for label, values in times.items():
        median = statistics.median(values)
        print(f"{label:<10} {median:7.1f}s {median / base:12.2f}")


if __name__ == "__main__":
    main()

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
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The user's local stack is reused: fix its home before the scratch state dir is set.
os.environ.setdefault("ELICE_STACK_DIR", os.environ.get("ELICE_STATE_DIR") or str(ROOT / ".elice"))

import docker  # noqa: E402
import yaml  # noqa: E402
from prefect import get_client  # noqa: E402
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from bench.ci_bench import _SCRATCH, checkout  # noqa: E402
from bench.quality_bench import WORKERS, service_target  # noqa: E402
from blocks.catalog import ServiceSpec  # noqa: E402
from blocks.config import PipelineConfig, load_config  # noqa: E402
from blocks.environments import EnvironmentSpec  # noqa: E402
from blocks.registry import OciRegistry  # noqa: E402
from cicd.stack import ensure_stack  # noqa: E402
from flows.ci import bounded_runner, ci  # noqa: E402
from tasks.deploy.docker import container_env, container_name  # noqa: E402
from tasks.images import (  # noqa: E402
    DOCKERFILE,
    build_context,
    image_labels,
    image_repository,
    local_ca_bundle,
)
from tasks.models import ImageRef  # noqa: E402
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


# What each make line is, from the command it runs (first match wins), and each flow
# task's phase by task name: the two timelines are compared phase by phase.
MAKE_PHASES = (
    ("/health", "health"),
    ("/containers/", "deploy"),
    ("syft", "sbom"),
    ("/build?", "build"),
    ("/tag?", "build"),
    ("/push?", "push"),
    ("/manifests/", "push"),
    ("pip-audit", "audit"),
    ("pip_audit", "audit"),
    ("pytest", "pytest"),
    ("bandit", "bandit"),
    ("mypy", "mypy"),
    ("ruff", "ruff"),
    (" sync ", "sync"),
    (" lock", "lock"),
    (" export ", "lock"),
)
FLOW_PHASES = {  # task run name prefix (before the service's name) -> phase
    "lock": "lock",
    "sync": "sync",
    "fingerprint": "fingerprint",
    "ruff": "ruff",
    "mypy": "mypy",
    "bandit": "bandit",
    "pytest": "pytest",
    "scan-dependencies": "audit",
    "publish-image": "build+push",
    "generate-sbom": "sbom",
    "deploy": "deploy",
    "verify": "health",
    "record": "record",
}


QUIET = ("record", "fingerprint")  # bookkeeping, not tools: left out of "at work"


def flow_phase(task_run_name: str) -> str:
    return next(
        (p for prefix, p in FLOW_PHASES.items() if task_run_name.startswith(prefix + "-")),
        "other",
    )


def make_phase(line: str) -> str:
    return next((phase for text, phase in MAKE_PHASES if text in line), "other")


def timed(recipe: str, service: str, log: Path) -> str:
    """A recipe line that appends `service phase start end` (epoch seconds) to `log`."""
    ignore = recipe.startswith("\t-@")
    command = recipe.removeprefix("\t-@" if ignore else "\t@")
    tag = f"{service} {make_phase(command)}"
    return (
        f"\t{'-' if ignore else ''}@s=$$(date +%s.%N); ( {command} ); r=$$?; "
        f'echo "{tag} $$s $$(date +%s.%N)" >> {shlex.quote(str(log))}; exit $$r'
    )


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


def machine_busy() -> float:
    """CPU seconds this machine has been busy (all cores, every process), from /proc/stat."""
    fields = Path("/proc/stat").read_text(encoding="utf-8").split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds of process `pid` so far (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except FileNotFoundError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            found.extend(int(c) for c in (task / "children").read_text().split())
    return found


def cpu_split(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far: the whole machine, and each named process."""
    return {"machine": machine_busy(), **{name: process_cpu(pid) for name, pid in pids.items()}}


def print_cpu(before: dict[str, float], after: dict[str, float]) -> None:
    used = ", ".join(f"{name} {after[name] - before[name]:.1f}s" for name in before)
    print(f"    CPU during the run: {used}")


def _label(pid: str) -> str:
    """What a process is, for the CPU table: its program, and a Python's module or script."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    program = Path(args[0].decode(errors="replace")).name or "?"
    if program.startswith("python") and len(args) > 1:
        rest = [a.decode(errors="replace") for a in args[1:3] if a]
        what = rest[1] if rest and rest[0] == "-m" and len(rest) > 1 else rest[0] if rest else ""
        return f"{program} {Path(what).name}"[:40]
    return program[:40]


class CpuSampler(threading.Thread):
    """Every process's CPU seconds by label, sampled every 0.2 s while the run lasts.

    A process that starts and ends between two samples is missed; one that ends after a
    sample loses its last 0.2 s. Good enough to see where the machine's time goes.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.last: dict[str, tuple[str, float]] = {}
        self.used: dict[str, float] = {}

    def _sample(self, *, baseline: bool = False) -> None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                cpu = process_cpu(int(entry.name))
                known = self.last.get(entry.name)
                label, before = known or (_label(entry.name), cpu if baseline else 0.0)
                self.used[label] = self.used.get(label, 0.0) + cpu - before
                self.last[entry.name] = (label, cpu)

    def run(self) -> None:
        self._sample(baseline=True)  # what ran before the run is not counted
        while not self.stop.wait(0.2):
            self._sample()
        self._sample()

    def print_top(self, count: int = 12) -> None:
        top = sorted(self.used.items(), key=lambda kv: -kv[1])[:count]
        print("    CPU by process: " + ", ".join(f"{label} {sec:.1f}s" for label, sec in top))


Span = tuple[str, str, float, float]  # service, phase, start, end (seconds from the run's start)


def make_spans(log: Path, begun: float) -> list[Span]:
    spans = []
    for line in log.read_text(encoding="utf-8").splitlines():
        service, phase, start, end = line.split()
        spans.append((service, phase, float(start) - begun, float(end) - begun))
    return spans


def flow_spans(flow_run_id: Any, begun: float) -> list[Span]:
    """The run's task runs as spans, once the server has them all (they arrive as events)."""
    spans: list[Span] = []
    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            spans = [
                (
                    run.name,
                    flow_phase(run.name),
                    run.start_time.timestamp() - begun,
                    run.end_time.timestamp() - begun,
                )
                for run in runs
                if run.start_time is not None and run.end_time is not None
            ]
            if runs and len(spans) == len(runs):
                break
            time.sleep(1)
    return spans


def report(label: str, spans: list[Span], wall: float) -> None:
    """Per phase: how many, their summed and median seconds, first start, last end; and
    how much of the wall time had 0, 1, 2 or more of them at work."""
    print(f"  {label}: phases (seconds from the start of the run)")
    print(f"    {'phase':<12} {'n':>3} {'sum':>7} {'median':>7} {'first':>7} {'last':>7}")
    phases: dict[str, list[Span]] = {}
    for span in spans:
        phases.setdefault(span[1], []).append(span)
    for phase, group in sorted(phases.items(), key=lambda kv: min(s[2] for s in kv[1])):
        lengths = [end - start for _, _, start, end in group]
        print(
            f"    {phase:<12} {len(group):>3} {sum(lengths):7.1f} {statistics.median(lengths):7.1f}"
            f" {min(s[2] for s in group):7.1f} {max(s[3] for s in group):7.1f}"
        )
    busy = [0.0, 0.0, 0.0]
    step, at = 0.1, 0.0
    work = [(start, end) for _, phase, start, end in spans if phase not in QUIET]
    while at < wall:
        running = sum(1 for start, end in work if start <= at < end)
        busy[min(running, 2)] += step
        at += step
    print(
        f"    at work: none {busy[0]:.1f}s, one {busy[1]:.1f}s, two or more {busy[2]:.1f}s"
        f" of {wall:.1f}s"
    )


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
        repo = fresh_checkout(names, cfg_path)
        make, log = makefile(repo, cfg, registry, socket, stack.base_image)
        make_cold(client, cfg, registry)
        cpu, sampler = cpu_split(watched), CpuSampler()
        sampler.start()
        begun, epoch = time.perf_counter(), time.time()
        subprocess.run(["make", "-s", f"-j{WORKERS}", "-f", str(make)], check=True)
        seconds = time.perf_counter() - begun
        sampler.stop.set()
        sampler.join()
        print_cpu(cpu, cpu_split(watched))
        sampler.print_top()
        report("make -j2", make_spans(log, epoch), seconds)
        return seconds

    def run_flow() -> float:
        repo = fresh_checkout(names, cfg_path)
        make_cold(client, cfg, registry)
        flow = ci.with_options(task_runner=bounded_runner(WORKERS))
        cpu, sampler = cpu_split(watched), CpuSampler()
        sampler.start()
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
        sampler.stop.set()
        sampler.join()
        print_cpu(cpu, cpu_split(watched))
        sampler.print_top()
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

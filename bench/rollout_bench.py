"""A bad release on the docker target: blue-green against in-place deploy-then-roll-back.

    ELICE_STACK_DIR=/var/tmp/elice-test-stack uv run python bench/rollout_bench.py [PAIRS]

Runs in one process against a temporary Prefect server, the local stack's engine and
registry (started or reused: `ensure_stack`), a real Prometheus configured like the
stack's (`tests/prometheus.py`: the stack's scrape job, rules and labels, file_sd targets,
the green folder included) and a pinned policy repository whose `config/approvals.yaml`
gives two environments the same analysis (error ratio, p99, alerts; bake 5 s, 3
measurements 2 s apart), one `rollout: in-place` (rb-ip), one `rollout: blue-green` (rb-bg).

Both serve a good release G of `course`. The bad release B answers half its requests
with 500 (`FAULT_ERROR_PERCENT=50`; /health and /ready stay healthy, so only the analysis
under load sees it). Each pair promotes B into rb-ip and into rb-bg (order alternated);
timed is the promotion's start to its end, when G serves everything again (in place: B
deployed, judged, rolled back, G healthy again; blue-green: green started, judged,
removed, G never left). A poller asks the environment's recorded address for /version
every 0.1 s meanwhile: printed are the answers that were not G (B's, or failures) and how
long the address did not answer G. Medians and the ratio blue-green / in-place; compare
within one run only.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_SCRATCH = Path(tempfile.mkdtemp(prefix="rollout-bench-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", str(_SCRATCH / "prefect-home"))
os.environ.setdefault("ELICE_STACK_DIR", os.environ.get("ELICE_STATE_DIR") or str(ROOT / ".elice"))
os.environ.setdefault("ELICE_STATE_DIR", str(_SCRATCH / "state"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import docker  # noqa: E402
import httpx  # noqa: E402
import yaml  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from blocks.config import PipelineConfig, load_config  # noqa: E402
from blocks.registry import OciRegistry  # noqa: E402
from blocks.stack import green_targets_dir, stack_dir  # noqa: E402
from core.records import ImageRef  # noqa: E402
from core.trust import TRUST_FILE_ENV  # noqa: E402
from flows.promotion import promote  # noqa: E402
from stack.control import ensure_stack  # noqa: E402
from tasks.deploy.docker import DockerDeployer  # noqa: E402
from tasks.images import build_image, image_repository, local_ca_bundle, push_image  # noqa: E402
from tests.approvers import Approvers  # noqa: E402
from tests.flows.chain import derive, put_verified, remove_containers, write_chain_config  # noqa: E402
from tests.flows.test_analysis_promotion import ANALYSIS  # noqa: E402
from tests.prometheus import running_prometheus  # noqa: E402
from tests.trust import trust_file_for  # noqa: E402

SOURCE, IN_PLACE, BLUE_GREEN = "rb-dev", "rb-ip", "rb-bg"
SERVICE = "course"
GREEN_OFFSET = 14600
OFFSETS = [(SOURCE, 12100), (IN_PLACE, 13600), (BLUE_GREEN, 14100)]


def write_config(prometheus_url: str | None) -> str:
    """course only, the three environments, the load probe's error limit relaxed (the
    analysis is what judges), both targets' Prometheus named."""
    extra = {e: {"prometheus_url": prometheus_url} for e in (IN_PLACE, BLUE_GREEN)}
    path = Path(
        write_chain_config(_SCRATCH / "pipeline.yaml", OFFSETS, **(extra if prometheus_url else {}))
    )
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["services"] = [s for s in data["services"] if s["name"] == SERVICE]
    for env in data["environments"][1:]:
        env["promotes_from"] = SOURCE
    data["performance"]["max_error_rate"] = 1.0
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def first_image(host: str, registry: OciRegistry, base: str | None) -> ImageRef:
    """One real image of `course`, built and pushed once."""
    token = uuid.uuid4().hex
    service = load_config().service(SERVICE)
    built = build_image.fn(
        service,
        docker_host=host,
        repository=image_repository(registry.address, registry.namespace, service.name),
        version=f"0.1.0-r{token[:8]}",
        commit=token,
        base_image=base,
        source="https://example.invalid/elice/monorepo",
        extra_ca=local_ca_bundle(),
    )
    return push_image.fn(built, docker_host=host, registry=registry)


class Poller:
    """/version of one address every 0.1 s in a thread: answers that were not `good`, and
    the seconds from the first such answer to the last one."""

    def __init__(self, address: str, good: str) -> None:
        self.address, self.good = address, good
        self.bad: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                digest = httpx.get(f"{self.address}/version", timeout=2).json().get("digest")
            except (httpx.HTTPError, ValueError):
                digest = None
            if digest != self.good:
                self.bad.append(time.monotonic())
            self.stop.wait(0.1)

    def __enter__(self) -> Poller:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)

    def exposed_s(self) -> float:
        return self.bad[-1] - self.bad[0] if self.bad else 0.0


def bad_promotion(
    cfg: PipelineConfig, cfg_path: str, env: str, good: str, bad: str
) -> tuple[float, int, float, str]:
    """Promote the bad release into `env`: seconds to the flow's end, answers not G,
    seconds they spanned, how it ended."""
    address = DockerDeployer().address(cfg.environment(env), cfg.service(SERVICE))
    with Poller(address, good) as poller:
        started = time.perf_counter()
        state = promote(
            environment=env,
            config_source=cfg_path,
            promoted_by="bench",
            health_deadline_s=60,
            drill_env={bad: {"FAULT_ERROR_PERCENT": "50"}},
            return_state=True,
        )
        seconds = time.perf_counter() - started
    serving = httpx.get(f"{address}/version", timeout=5).json()["digest"]
    assert serving == good, f"{env} serves {serving[:19]} after the bad release, not G"
    return seconds, len(poller.bad), poller.exposed_s(), (state.message or "")[:90]


def main() -> None:
    pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    stack = ensure_stack()
    os.environ["DOCKER_HOST"] = stack.docker_host
    client = docker.DockerClient(base_url=stack.docker_host, timeout=600)
    registry = OciRegistry(address=stack.registry, insecure=True)
    people = Approvers(_SCRATCH, ["bench"])
    analysis = {
        IN_PLACE: ANALYSIS,
        BLUE_GREEN: ANALYSIS | {"rollout": "blue-green", "green_port_offset": GREEN_OFFSET},
    }
    people.set_policy({}, analysis=analysis)
    envs = tuple(name for name, _ in OFFSETS)
    os.environ[TRUST_FILE_ENV] = str(trust_file_for(_SCRATCH, people.bare, environments=envs))
    scraped = load_config(write_config(None))
    print(f"{os.cpu_count()} cores, {pairs} pairs, analysis bake {ANALYSIS['bake_s']} s")
    try:
        with (
            running_prometheus(
                _SCRATCH / "prometheus", scraped, green_targets_dir(stack_dir())
            ) as url,
            prefect_test_harness(server_startup_timeout=300),
        ):
            cfg_path = write_config(url)
            cfg = load_config(cfg_path)
            remove_containers(client, list(envs))
            good = first_image(stack.docker_host, registry, stack.base_image)
            bad = derive(client, good, f"rb-{uuid.uuid4().hex[:6]}")
            for env in (IN_PLACE, BLUE_GREEN):
                put_verified(cfg, env, SERVICE, good)
            put_verified(cfg, SOURCE, SERVICE, bad)
            times: dict[str, list[float]] = {IN_PLACE: [], BLUE_GREEN: []}
            for index in range(pairs):
                order = (IN_PLACE, BLUE_GREEN) if index % 2 == 0 else (BLUE_GREEN, IN_PLACE)
                for env in order:
                    seconds, count, exposed, how = bad_promotion(
                        cfg, cfg_path, env, good.digest, bad.digest
                    )
                    times[env].append(seconds)
                    note = f"{count} answers not G over {exposed:4.1f} s"
                    print(f"  {env}: {seconds:6.1f} s, {note}  ({how})")
            base = statistics.median(times[IN_PLACE])
            for env, label in (
                (IN_PLACE, "in place, then rolled back"),
                (BLUE_GREEN, "blue-green"),
            ):
                median = statistics.median(times[env])
                print(f"{label:<28} median {median:6.1f} s  ratio {median / base:.2f}")
    finally:  # the engine outlives this process: leave no container behind
        remove_containers(client, list(envs))
        client.close()


if __name__ == "__main__":
    main()

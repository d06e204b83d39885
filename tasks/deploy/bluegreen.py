"""Blue-green on the docker target: the release judged on green ports before it serves.

An environment whose analysis says `rollout: blue-green` (`core/analysis.py`, in the
approval policy on the protected branch) takes a release in two steps:

1. green: each changed service's new image starts as a container of its own on
   `green_port_offset` + its port, beside the serving (blue) container, which keeps the
   environment's address. Its scrape target is written for Prometheus (file_sd, labelled
   `environment: <env>-green`), then the health checks, the load probe and the analysis
   (its `$environment` rendered as `<env>-green`: green alone) judge it.
2. the switch: only when green passed, each service's recorded address (the
   environment's port, which Prometheus, `cicd health`, the ledger and clients know) is
   moved to the judged image by the in-place deploy: blue stopped but kept, the image
   started on the recorded port, health-checked there on its digest, and blue removed
   only then (put back if the switch does not hold). Green is removed after.

Any failure or exception in step 1 removes green and its target and leaves blue serving
everything: the error raised (`GreenStopped`) says so, and the promotion records it. A run
killed in between leaves its green running; the next promotion or rollback of the
environment removes it (`remove_stale_greens`, under the deploy lock).

    green_offset_of(run, deploy_target, env, offsets)   the checked green offset, or None
    promote_blue_green(...)                             both steps; the release's baselines
    remove_stale_greens(deploy_target, env, catalog, folder)   what a killed run left
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from blocks.catalog import ServiceSpec
from blocks.config import PerformancePolicy
from blocks.environments import EnvironmentSpec
from core.analysis import GREEN_SUFFIX, green_overlaps
from core.errors import PromotionError, PromotionRefused
from core.records import DeployedService, ImageRef, PromotionPlan
from tasks.analysis import AnalysisRun, measure
from tasks.deploy.docker import DockerDeployer
from tasks.deploy.target import DeployTarget
from tasks.deploy.waves import (
    changed_services,
    deploy_in_waves,
    takes_rollout,
    trial_removed_on_failure,
    verify_release,
)
from tasks.performance import Baseline
from tasks.process import run_logger

SCRAPE_WAIT_S = 30.0
"""How long green may take to be scraped before its bake starts: Prometheus applies
discovered targets in batches (every 5 s), so a bake started at once may measure nothing."""


class GreenStopped(PromotionError):
    """A blue-green release failed at its green step: green removed, blue never left."""


def green_offset_of(
    run: AnalysisRun | None,
    deploy_target: DeployTarget,
    env: EnvironmentSpec,
    offsets: dict[str, int],
) -> int | None:
    """The green offset of `env`'s blue-green rollout (None: in place), checked before
    anything changes against `offsets` (every configured environment's port offset).

    Raises:
        PromotionRefused: blue-green on another target, or green ports that another
            environment's services listen on.
    """
    if run is None or not takes_rollout(run, deploy_target, env, "blue-green"):
        return None
    green = run.policy.green_port_offset
    if green is None:  # the policy refuses this when it is read; a hand-made one may not
        msg = f"{env.name}: rollout: blue-green needs green_port_offset in the policy"
        raise PromotionRefused(msg)
    taken = green_overlaps(green, offsets)
    if taken:
        msg = (
            f"{env.name}: green_port_offset {green} shares ports with environment(s) "
            f"{', '.join(taken)} (offsets within 11 of each other overlap)"
        )
        raise PromotionRefused(msg)
    return green


def _target_file(folder: Path, env: EnvironmentSpec, service: ServiceSpec) -> Path:
    return folder / f"{env.name}-{service.name}.json"


def write_green_target(
    folder: Path, env: EnvironmentSpec, service: ServiceSpec, address: str
) -> None:
    """Green's file_sd group for Prometheus, written atomically (a reader never sees half)."""
    group = {
        "targets": [address.removeprefix("http://")],
        "labels": {
            "service": service.name,
            "environment": env.name + GREEN_SUFFIX,
            "namespace": env.namespace,
            "track": "green",
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".green-", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump([group], handle)
    Path(tmp).chmod(0o644)
    Path(tmp).replace(_target_file(folder, env, service))


@task(task_run_name="start_green-{service.name}-{env.name}", cache_policy=NO_CACHE)
def start_green(
    deploy_target: DeployTarget,
    env: EnvironmentSpec,
    service: ServiceSpec,
    image: ImageRef,
    green: tuple[int, Path],
    deadline_s: float,
) -> str:
    """Green of `service` healthy on its own port and scraped; returns its address.
    `green` is (the green port offset, the folder of green scrape targets)."""
    deployer = deploy_target.deployer()
    if not isinstance(deployer, DockerDeployer):
        msg = f"blue-green needs the docker target, not {deployer.name}"
        raise PromotionRefused(msg)
    address = deployer.start_green(env, service, image, green[0], deadline_s=deadline_s)
    write_green_target(green[1], env, service, address)
    return address


def remove_greens(
    deploy_target: DeployTarget, env: EnvironmentSpec, specs: list[ServiceSpec], folder: Path
) -> None:
    """Every green container and scrape target of `specs` removed; a failure to remove one
    is logged (never raised over the outcome it follows) and the others still go."""
    deployer = deploy_target.deployer()
    for spec in specs:
        _target_file(folder, env, spec).unlink(missing_ok=True)
        try:
            if isinstance(deployer, DockerDeployer):
                deployer.remove_green(env, spec)
        except Exception as exc:  # noqa: BLE001 - reported, the others still removed
            run_logger().error("%s: green of %s not removed: %s", env.name, spec.name, exc)


def remove_stale_greens(
    deploy_target: DeployTarget,
    env: EnvironmentSpec,
    catalog: Mapping[str, ServiceSpec],
    folder: Path,
) -> list[str]:
    """The greens a killed run left in `env` removed, containers and scrape targets (call
    it holding `deploy-<env>`: no live run has a green then); returns their services.
    Without it a dead run's green would keep serving on its green port, and Prometheus
    would keep scraping it as `<env>-green`. Nothing on other targets."""
    if deploy_target.target != "docker":
        return []
    deployer = deploy_target.deployer()
    if not isinstance(deployer, DockerDeployer):
        return []
    stale = sorted(
        {name for name in deployer.greens(env) if name in catalog}
        | {name for name in catalog if _target_file(folder, env, catalog[name]).exists()}
    )
    for name in stale:
        run_logger().warning("%s: removing the green of %s a dead run left", env.name, name)
    remove_greens(deploy_target, env, [catalog[name] for name in stale], folder)
    return stale


def _judge_green(
    deploy_target: DeployTarget,
    env: EnvironmentSpec,
    todo: list[ServiceSpec],
    plan: PromotionPlan,
    green: tuple[int, Path],
    verify: tuple[float, Mapping[str, Mapping[str, float] | None], PerformancePolicy, AnalysisRun],
) -> dict[str, Baseline]:
    """Step 1: greens started (all at once), then judged like a release: health on their
    digests, baselines against the previous ones, the analysis of `<env>-green`."""
    deadline_s, previous, performance, judge = verify
    futures = [
        start_green.submit(
            deploy_target, env, spec, plan.change(spec.name).image, green, deadline_s
        )
        for spec in todo
    ]
    for future in futures:
        future.wait()
    addresses = {spec.name: future.result() for spec, future in zip(todo, futures, strict=True)}
    green_judge = replace(judge, label=env.name + GREEN_SUFFIX)
    wait_scraped(green_judge, [spec.name for spec in todo])
    return verify_release(addresses, todo, plan, previous, performance, green_judge)


def wait_scraped(run: AnalysisRun, services: list[str], timeout_s: float = SCRAPE_WAIT_S) -> bool:
    """Wait (at most `timeout_s`) until Prometheus scrapes every green (or canary: the
    track `run.label` names) of `services` (its `up` is 1), so the bake measures it. Not
    scraped in time, or no Prometheus to ask, is no verdict of its own: the analysis then
    finds no data, which is never a pass."""
    end = time.monotonic() + timeout_s
    queries = [f'up{{environment="{run.label}",service="{name}"}}' for name in services]
    while True:
        answers = [measure(run.prometheus_url, query) for query in queries]
        if all(value == 1 for value, _ in answers):
            return True
        unanswered = [why for value, why in answers if value is None and "no data" not in why]
        if unanswered or time.monotonic() >= end:
            why = unanswered[0] if unanswered else f"not after {timeout_s:.0f} s"
            where = ", ".join(services)
            run_logger().warning("%s of %s not scraped: %s", run.label, where, why)
            return False
        time.sleep(0.5)


def promote_blue_green(
    deploy_target: DeployTarget,
    env: EnvironmentSpec,
    specs: list[ServiceSpec],
    plan: PromotionPlan,
    live: Mapping[str, DeployedService | None],
    green: tuple[int, Path],
    verify: tuple[float, Mapping[str, Mapping[str, float] | None], PerformancePolicy, AnalysisRun],
    deployed: list[str],
    wave_setting: str = "",
) -> dict[str, Baseline]:
    """The release judged as green, then switched; returns its baselines (judged as green).

    `green` is (the green port offset, the folder of green scrape targets); `verify` is
    (the health deadline, the previous baselines, the load probe's policy, the analysis).

    Raises:
        GreenStopped: green failed or could not be judged; nothing else changed.
        DeployError / ToolError: a switch failed (that service's blue was put back; the
            caller puts back the others).
    """
    todo = changed_services(specs, plan, live)
    with trial_removed_on_failure(
        lambda: remove_greens(deploy_target, env, todo, green[1]),
        GreenStopped,
        f"blue-green stopped at the green step in {env.name}",
        "green removed, the previous release served the environment's address throughout",
    ):
        baselines = _judge_green(deploy_target, env, todo, plan, green, verify)
    run_logger().info("green passed in %s: switching %s", env.name, [s.name for s in todo])
    try:
        deploy_in_waves(deploy_target, env, todo, plan, live, verify[0], deployed, wave_setting)
    finally:
        remove_greens(deploy_target, env, todo, green[1])
    return baselines

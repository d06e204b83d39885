"""The rollout field of an environment's analysis (blue-green on the docker target, canary
on the kubernetes target): bad values refused naming the field, and a rollout the
environment cannot take refused before anything changes. The rollouts themselves:
`tests/flows/test_bluegreen_promotion.py`, `tests/tasks/deploy/test_canary_real.py`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from blocks.approvals import parse_policy
from blocks.catalog import ServiceSpec
from blocks.environments import EnvironmentSpec
from core.errors import ConfigError, PromotionRefused
from stack.monitoring_config import prometheus_config
from stack.ports import free_port
from tasks.analysis import AnalysisRun
from tasks.deploy.bluegreen import green_offset_of, wait_scraped, write_green_target
from tasks.deploy.canary import canary_replicas_of
from tasks.deploy.target import DeployTarget

CHECK = {"name": "errors", "query": "vector(0)", "below": 0.01}
ENV = EnvironmentSpec(
    name="bg-unit",
    namespace="bg-unit",
    replicas={"min": 1, "max": 1},
    log_level="INFO",
    storage="minio",
    local_port_offset=0,
)


def _policy_error(analysis: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_policy(yaml.safe_dump({"analysis": {"production": analysis}}))
    return str(caught.value)


def _run(**fields: Any) -> AnalysisRun:
    text = yaml.safe_dump({"analysis": {ENV.name: {"checks": [CHECK], **fields}}})
    return AnalysisRun(ENV.name, parse_policy(text).analysis[ENV.name], None)


def test_rollout_is_in_place_unless_the_policy_says_blue_green() -> None:
    assert _run().policy.rollout == "in-place"
    assert _run().policy.green_port_offset is None
    blue_green = _run(rollout="blue-green", green_port_offset=40000).policy
    assert (blue_green.rollout, blue_green.green_port_offset) == ("blue-green", 40000)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"rollout": "rolling"}, "analysis.production.rollout"),
        ({"rollout": "in-place", "canary_replicas": 1}, "canary_replicas is given"),
        ({"rollout": "canary", "green_port_offset": 40000}, "green_port_offset is given"),
        ({"rollout": "canary", "canary_replicas": 0}, "production.canary_replicas"),
        ({"rollout": "canary", "canary_replicas": 21}, "production.canary_replicas"),
        ({"rollout": "canary", "canary_replicas": [1, 21]}, "production.canary_replicas"),
        ({"rollout": "canary", "canary_replicas": []}, "production.canary_replicas"),
        ({"rollout": "canary", "canary_replicas": [1, 2, 3, 4, 5, 6]}, "at most 5 items"),
        ({"rollout": "canary", "canary_replicas": [2, 1]}, "must grow, each above"),
        ({"rollout": "canary", "canary_replicas": [2, 2]}, "must grow, each above"),
        ({"rollout": "canary", "canary_replicas": True}, "production.canary_replicas"),
        ({"rollout": "blue-green"}, "green_port_offset is required with rollout: blue-green"),
        ({"rollout": "in-place", "green_port_offset": 40000}, "green_port_offset is given"),
        ({"rollout": "blue-green", "green_port_offset": 999}, "production.green_port_offset"),
        ({"rollout": "blue-green", "green_port_offset": 41988}, "production.green_port_offset"),
        ({"rollout": "blue-green", "green_port_offset": "high"}, "production.green_port_offset"),
        ({"rollout": "blue-green", "green_port": 40000}, "analysis.production.green_port"),
    ],
)
def test_a_bad_rollout_is_refused_naming_the_field(fields: dict[str, Any], named: str) -> None:
    assert named in _policy_error({"checks": [CHECK], **fields})


def test_the_highest_green_offset_keeps_green_ports_below_the_ephemeral_range() -> None:
    assert _run(rollout="blue-green", green_port_offset=41987).policy.green_port_offset == 41987


def test_blue_green_on_the_kubernetes_target_is_refused_before_anything_changes() -> None:
    run = _run(rollout="blue-green", green_port_offset=40000)
    with pytest.raises(PromotionRefused, match="docker target only"):
        green_offset_of(run, DeployTarget(target="kubernetes"), ENV, {ENV.name: 0})


def test_a_canary_takes_the_kubernetes_target_and_one_replica_unless_told() -> None:
    kubernetes = DeployTarget(target="kubernetes")
    assert canary_replicas_of(_run(rollout="canary"), kubernetes, ENV) == (1,)
    assert canary_replicas_of(_run(rollout="canary", canary_replicas=2), kubernetes, ENV) == (2,)
    steps = _run(rollout="canary", canary_replicas=[1, 3])
    assert canary_replicas_of(steps, kubernetes, ENV) == (1, 3)
    assert canary_replicas_of(_run(), kubernetes, ENV) is None
    assert canary_replicas_of(None, kubernetes, ENV) is None
    blue_green = _run(rollout="blue-green", green_port_offset=40000)
    assert canary_replicas_of(blue_green, DeployTarget(), ENV) is None


def test_a_canary_on_the_docker_target_is_refused_before_anything_changes() -> None:
    with pytest.raises(PromotionRefused, match="rollout: canary is built for the kubernetes"):
        canary_replicas_of(_run(rollout="canary"), DeployTarget(), ENV)


@pytest.mark.parametrize("other", [39989, 40000, 40011])
def test_green_ports_another_environment_listens_on_are_refused(other: int) -> None:
    run = _run(rollout="blue-green", green_port_offset=40000)
    shared = r"green_port_offset 40000 shares ports with environment\(s\) prod"
    with pytest.raises(PromotionRefused, match=shared):
        green_offset_of(run, DeployTarget(), ENV, {ENV.name: 0, "prod": other})


def test_green_ports_clear_of_every_environment_are_taken() -> None:
    run = _run(rollout="blue-green", green_port_offset=40000)
    offsets = {ENV.name: 0, "a": 39988, "b": 40012}
    assert green_offset_of(run, DeployTarget(), ENV, offsets) == 40000
    assert green_offset_of(_run(), DeployTarget(target="kubernetes"), ENV, offsets) is None
    assert green_offset_of(None, DeployTarget(), ENV, offsets) is None


def test_green_is_scraped_from_the_folder_the_stack_prometheus_reads(tmp_path: Path) -> None:
    folder = tmp_path / "green"
    spec = ServiceSpec(name="course", port=8004, libs=["servicekit"])
    write_green_target(folder, ENV, spec, "http://127.0.0.1:48004")
    (group,) = json.loads((folder / "bg-unit-course.json").read_text())
    assert group == {
        "targets": ["127.0.0.1:48004"],
        "labels": {
            "service": "course",
            "environment": "bg-unit-green",
            "namespace": "bg-unit",
            "track": "green",
        },
    }
    config = prometheus_config(tmp_path / "targets.json", "127.0.0.1:1", green_targets=folder)
    (discovery,) = config["scrape_configs"][0]["file_sd_configs"]
    assert discovery["files"] == [str(tmp_path / "targets.json"), str(folder / "*.json")]


def test_no_prometheus_to_ask_ends_the_wait_for_green_at_once() -> None:
    run = AnalysisRun(ENV.name, _run().policy, f"http://127.0.0.1:{free_port()}", "bg-unit-green")
    started = time.monotonic()
    assert wait_scraped(run, ["course"], timeout_s=60) is False
    assert time.monotonic() - started < 10

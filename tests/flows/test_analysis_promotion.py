"""A promotion judged by the environment's analysis: real engine, registry, Prefect server,
a pinned policy repository whose `config/approvals.yaml` names an-stg's checks, and a real
Prometheus configured like the stack's, scraping an-dev and an-stg (host ports 35xxx).

The load probe's own error limit is relaxed in this configuration so that the analysis,
measured by Prometheus under load, is what stops a failing release. In file order:

    seed D1 -> D2 healthy (passes) -> D3 half its requests 500 (rolled back to D2)
            -> D4 with Prometheus unreachable (inconclusive: rolled back to D2)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from blocks.config import PipelineConfig, load_config
from blocks.stack import StackInfo
from core.errors import PromotionRolledBack
from core.records import ImageRef
from flows.promotion import promote
from stack.ports import free_port
from tasks.deploy.docker import DockerDeployer
from tasks.health import probe_health
from tests.approvers import Approvers
from tests.flows.chain import derive, put_verified, remove_containers, write_chain_config
from tests.ledgers import current_ledger
from tests.prometheus import running_prometheus
from tests.trust import pin_repository

pytestmark = pytest.mark.stack

DEV, STG = "an-dev", "an-stg"
SERVICE = "course"
SELECTOR = 'service="$service",environment="$environment"'
ERROR_RATIO = (
    f'(sum(rate(http_requests_total{{{SELECTOR},status=~"5.."}}[4s])) or vector(0))'
    f" / sum(rate(http_requests_total{{{SELECTOR}}}[4s]))"
)
P99 = (
    "histogram_quantile(0.99, sum by (le) "
    f"(rate(http_request_duration_seconds_bucket{{{SELECTOR}}}[4s])))"
)
ALERTS = f'count(ALERTS{{alertstate="firing",{SELECTOR}}}) or vector(0)'
ANALYSIS = {
    "checks": [
        {"name": "error-ratio", "query": ERROR_RATIO, "below": 0.05},
        {"name": "p99-latency", "query": P99, "below": 2.0, "below_previous": 5},
        {"name": "alerts-firing", "query": ALERTS, "below": 1},
    ],
    "bake_s": 5,
    "interval_s": 2,
    "count": 3,
    "failure_limit": 0,
}


@dataclass
class Setup:
    cfg: PipelineConfig
    cfg_path: str
    unreachable_cfg_path: str
    images: dict[str, ImageRef]


def _config(folder: Path, name: str, prometheus_url: str | None) -> str:
    """The chain's configuration, an-stg's Prometheus named, the probe's error limit relaxed."""
    extra = {STG: {"prometheus_url": prometheus_url}} if prometheus_url else {}
    return write_chain_config(
        folder / name,
        [(DEV, 27100), (STG, 27600)],
        [(SERVICE, 8004)],
        performance={"max_error_rate": 1.0},
        **extra,
    )


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
    stack: StackInfo,
    docker_client: docker.DockerClient,
    pushed_image: ImageRef,
) -> Iterator[Setup]:
    """an-stg serves D1; its analysis is in the pinned policy; Prometheus scrapes it."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DOCKER_HOST", stack.docker_host)
    folder = tmp_path_factory.mktemp("analysis")
    scraped = load_config(_config(folder, "targets.yaml", None))
    with running_prometheus(folder / "prometheus", scraped) as url:
        cfg_path = _config(folder, "pipeline.yaml", url)
        unreachable = _config(folder, "unreachable.yaml", f"http://127.0.0.1:{free_port()}")
        people = Approvers(folder, ["alice"])
        people.set_policy({}, analysis={STG: ANALYSIS})
        pin_repository(mp, folder, people.bare, environments=(DEV, STG))
        cfg = load_config(cfg_path)
        remove_containers(docker_client, [DEV, STG])
        images = {"D1": pushed_image}
        for name in ("D2", "D3", "D4"):
            images[name] = derive(docker_client, pushed_image, f"an-{name.lower()}")
        put_verified(cfg, STG, SERVICE, images["D1"])
        yield Setup(cfg, cfg_path, unreachable, images)
    remove_containers(docker_client, [DEV, STG])
    mp.undo()


def serving(s: Setup) -> str | None:
    """The digest course's /version reports in an-stg (None: not healthy)."""
    spec = s.cfg.service(SERVICE)
    address = DockerDeployer().address(s.cfg.environment(STG), spec)
    if not probe_health(address, spec, deadline_s=10).ok:
        return None
    digest: str = httpx.get(f"{address}/version", timeout=10).json()["digest"]
    return digest


def analysis_rows(flow_run_id: object) -> list[dict[str, str]]:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"analysis-{STG}"]))
        )
    (mine,) = [a for a in artifacts if a.flow_run_id == flow_run_id]
    assert mine.type == "table"
    data = mine.data if isinstance(mine.data, list) else json.loads(str(mine.data))
    return list(data)


def test_a_healthy_release_passes_and_its_verdict_enters_the_ledger(setup: Setup) -> None:
    put_verified(setup.cfg, DEV, SERVICE, setup.images["D2"])
    state = promote(
        environment=STG, config_source=setup.cfg_path, health_deadline_s=30, return_state=True
    )
    outcome = state.result()
    assert outcome.deployed == [SERVICE]
    record = current_ledger().current(STG).services[SERVICE]
    assert record.image.digest == setup.images["D2"].digest
    assert record.analysis is not None
    assert record.analysis.startswith("passed at http://127.0.0.1:")
    assert "error-ratio" in record.analysis
    assert record.baseline is not None
    assert record.baseline["analysis.error-ratio"] < 0.05
    assert "analysis.p99-latency" in record.baseline
    rows = analysis_rows(state.state_details.flow_run_id)
    assert {r["check"] for r in rows} == {"error-ratio", "p99-latency", "alerts-firing"}
    assert all(r["verdict"] == "passed" for r in rows)
    assert all(len(r["measurements"].split(", ")) == 3 for r in rows)
    selector = 'http_requests_total{service="course",environment="an-stg"'
    assert any(selector in r["query"] for r in rows)
    assert serving(setup) == setup.images["D2"].digest


def _rolled_back(setup: Setup, image: str, **params: Any) -> PromotionRolledBack:
    """Promote `image` into an-stg, expect it rolled back with nothing lost: D2 serves,
    the ledger records what served before and the attempt, no intent left."""
    put_verified(setup.cfg, DEV, SERVICE, setup.images[image])
    before = current_ledger().current(STG)
    with pytest.raises(PromotionRolledBack) as caught:
        promote(environment=STG, health_deadline_s=30, **params)
    after = current_ledger().current(STG)
    assert after.services == before.services
    assert after.revision == before.revision + 2
    assert after.in_progress is None
    assert "rolled back" in after.change
    assert serving(setup) == setup.images["D2"].digest
    assert caught.value.restored == {SERVICE: setup.images["D2"].digest}
    return caught.value


def test_a_release_failing_under_load_is_rolled_back_naming_query_values_and_limit(
    setup: Setup,
) -> None:
    d3 = setup.images["D3"].digest
    error = _rolled_back(
        setup,
        "D3",
        config_source=setup.cfg_path,
        drill_env={d3: {"FAULT_ERROR_PERCENT": "50"}},
    )
    message = str(error)
    assert f"analysis failed in {STG}" in message
    assert 'course: error-ratio `(sum(rate(http_requests_total{service="course"' in message
    assert "measured " in message
    assert "(limit < 0.05; 1 failed, 0 allowed, 3 measurements)" in message


def test_prometheus_unreachable_is_inconclusive_and_fails_the_release(setup: Setup) -> None:
    error = _rolled_back(setup, "D4", config_source=setup.unreachable_cfg_path)
    message = str(error)
    assert f"analysis inconclusive in {STG} (never a pass)" in message
    assert "did not answer" in message
    assert "measured no data" in message

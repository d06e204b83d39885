"""`cicd setup` for real: a fresh Prefect server (dry run, setup, drift), then the session's."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
import yaml
from kubernetes.client import CoreV1Api
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    BlockDocumentUpdate,
    DeploymentUpdate,
    GlobalConcurrencyLimitUpdate,
    WorkPoolCreate,
    WorkPoolUpdate,
)
from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
from prefect.events.worker import EventsWorker
from prefect.settings import PREFECT_API_URL, temporary_settings
from pydantic import SecretStr
from typer.testing import CliRunner

from blocks.catalog import ServiceCatalog
from blocks.config import PipelineConfig
from blocks.environments import EnvironmentCatalog
from blocks.kubernetes_target import KubernetesTarget
from cicd.setup_cli import register
from core.errors import ConfigError
from reconcile.setup import (
    DOCKER_POOL,
    KUBERNETES_POOL,
    PROCESS_POOL,
    PRODUCTION_POOL,
    VANISHED_RUNS,
    SetupChange,
    ensure_setup,
    read_prefect_file,
)
from stack.ports import free_port
from tasks.deploy.target import KUBERNETES_TARGET_BLOCK
from tasks.locks import lock_name
from tasks.process import which
from tests.k8s_sim import KubeSimulator

REPO = Path(__file__).resolve().parents[2]
DEPLOYMENTS = {
    "ci/ci",
    "ci/nightly-rebuild",
    "ci-service/ci-service",
    "promote/promote",
    "promote/promote-production",
    "rollback/rollback",
    "rollback/rollback-production",
    "health-check/health-check",
}
LIMITS = {lock_name(env) for env in ("dev", "staging", "production")}
BLOCKS = {"elice-services", "elice-environments"}
POOLS = {
    PROCESS_POOL: "process",
    PRODUCTION_POOL: "process",
    DOCKER_POOL: "docker",
    KUBERNETES_POOL: "kubernetes",
}


@pytest.fixture(scope="module")
def fresh_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prefect server of its own (a real `prefect server start`), empty at first."""
    home = tmp_path_factory.mktemp("fresh-prefect")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    with (home / "server.log").open("wb") as log:
        server = subprocess.Popen(
            [which("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, (home / "server.log").read_text()
            assert time.monotonic() < deadline, (home / "server.log").read_text()
            time.sleep(0.5)
        yield url
    finally:
        EventsWorker.drain_all(timeout=10)  # events of this process, sent before it stops
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)


def by_kind(changes: list[SetupChange]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for change in changes:
        found.setdefault(change.kind, set()).add(change.name)
    return found


def actions(changes: list[SetupChange]) -> dict[str, str]:
    return {f"{c.kind}:{c.name}": c.action for c in changes}


def server_state(url: str) -> dict[str, set[str]]:
    """Which of setup's items the server at `url` holds."""
    with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as c:
        pools = {p.name for p in c.read_work_pools()} & set(POOLS)
        limits = {lim.name for lim in c.read_global_concurrency_limits(limit=200)} & LIMITS
        blocks = {b.name for b in c.read_block_documents()} & BLOCKS
        flows = {f.id: f.name for f in c.read_flows()}
        deployments = {f"{flows[d.flow_id]}/{d.name}" for d in c.read_deployments()}
        automations = {a.name for a in c.read_automations_by_name(VANISHED_RUNS)}
    return {
        "work-pool": pools,
        "concurrency-limit": limits,
        "block": blocks,
        "deployment": deployments & DEPLOYMENTS,
        "automation": automations,
    }


@pytest.mark.slow
def test_a_fresh_server_dry_run_then_setup_then_nothing_to_change(
    fresh_server: str, config: PipelineConfig
) -> None:
    started = time.monotonic()
    planned = ensure_setup(fresh_server, dry_run=True)
    assert {c.action for c in planned} == {"create"}
    assert by_kind(planned) == {
        "work-pool": set(POOLS),
        "concurrency-limit": LIMITS,
        "block": BLOCKS,
        "deployment": DEPLOYMENTS,
        "automation": {VANISHED_RUNS},
    }
    assert server_state(fresh_server) == {
        "work-pool": set(),
        "concurrency-limit": set(),
        "block": set(),
        "deployment": set(),
        "automation": set(),
    }

    done = ensure_setup(fresh_server)
    assert actions(done) == actions(planned)
    assert server_state(fresh_server) == by_kind(planned)

    again = ensure_setup(fresh_server, dry_run=True)
    assert {c.action for c in again} == {"unchanged"}, [c for c in again if c.action != "unchanged"]
    assert {c.action for c in ensure_setup(fresh_server)} == {"unchanged"}
    print(f"fresh server: dry run, setup, dry run, setup in {time.monotonic() - started:.1f}s")

    with temporary_settings(updates={PREFECT_API_URL: fresh_server}):
        assert ServiceCatalog.load("elice-services").services == config.catalog.services
        envs = EnvironmentCatalog.load("elice-environments").environments
        assert envs == config.environments.environments
        with get_client(sync_client=True) as client:
            for name, kind in POOLS.items():
                pool = client.read_work_pool(name)
                assert pool.type == kind
                assert set(pool.base_job_template) == {"job_configuration", "variables"}
            docker_vars = client.read_work_pool(DOCKER_POOL).base_job_template["variables"]
            assert "image" in docker_vars["properties"]
            for name in LIMITS:
                limit = client.read_global_concurrency_limit_by_name(name)
                assert (limit.limit, limit.active) == (1, True)
            ci = client.read_deployment_by_name("ci/ci")
            assert ci.parameters == {"deliver": True, "environment": "dev"}
            assert ci.pull_steps == [
                {
                    "prefect.deployments.steps.set_working_directory": {
                        "directory": "{{ $ELICE_REPO }}"
                    }
                }
            ]
            assert ci.work_pool_name == PROCESS_POOL
            assert ci.enforce_parameter_schema
            promote = client.read_deployment_by_name("promote/promote")
            assert "promoted_by" not in promote.parameters
            [nightly] = client.read_deployment_by_name("ci/nightly-rebuild").schedules
            assert isinstance(nightly.schedule, CronSchedule)
            assert (nightly.schedule.cron, nightly.schedule.timezone) == ("0 3 * * *", "Asia/Seoul")
            assert nightly.active
            health_check = client.read_deployment_by_name("health-check/health-check")
            assert health_check.work_pool_name == PRODUCTION_POOL
            [health] = health_check.schedules
            assert isinstance(health.schedule, IntervalSchedule)
            assert health.schedule.interval.total_seconds() == 900
            assert health.active


@pytest.mark.slow
def test_setup_puts_back_what_was_changed_on_the_server(fresh_server: str) -> None:
    ensure_setup(fresh_server)
    with temporary_settings(updates={PREFECT_API_URL: fresh_server}):
        with get_client(sync_client=True) as client:
            client.update_global_concurrency_limit(
                "deploy-dev", GlobalConcurrencyLimitUpdate(limit=3)
            )
            nightly = client.read_deployment_by_name("ci/nightly-rebuild")
            client.update_deployment_schedule(nightly.id, nightly.schedules[0].id, active=False)
            template = client.read_work_pool(DOCKER_POOL).base_job_template
            template["variables"]["properties"]["auto_remove"]["default"] = True
            client.update_work_pool(DOCKER_POOL, WorkPoolUpdate(base_job_template=template))
            promote = client.read_deployment_by_name("promote/promote")
            client.update_deployment(
                promote.id,
                DeploymentUpdate(parameters={"environment": "staging", "promoted_by": "x"}),
            )

    drift = [c for c in ensure_setup(fresh_server, dry_run=True) if c.action != "unchanged"]
    assert {(c.kind, c.name, c.action) for c in drift} == {
        ("concurrency-limit", "deploy-dev", "update"),
        ("deployment", "ci/nightly-rebuild", "update"),
        ("work-pool", DOCKER_POOL, "update"),
        ("deployment", "promote/promote", "update"),
    }
    details = {c.name: c.detail for c in drift}
    assert details["deploy-dev"] == "3 slots -> 1 slot"
    assert details["ci/nightly-rebuild"] == "schedules"
    assert details["promote/promote"] == "parameters"

    ensure_setup(fresh_server)
    assert {c.action for c in ensure_setup(fresh_server, dry_run=True)} == {"unchanged"}
    with temporary_settings(updates={PREFECT_API_URL: fresh_server}):
        with get_client(sync_client=True) as client:
            [schedule] = client.read_deployment_by_name("ci/nightly-rebuild").schedules
            assert schedule.active
            promote = client.read_deployment_by_name("promote/promote")
            assert promote.parameters == {"environment": "staging"}


@pytest.mark.slow
def test_a_pool_of_another_type_is_refused_before_any_change(fresh_server: str) -> None:
    ensure_setup(fresh_server)
    with temporary_settings(updates={PREFECT_API_URL: fresh_server}):
        with get_client(sync_client=True) as client:
            client.delete_work_pool(KUBERNETES_POOL)
            client.create_work_pool(WorkPoolCreate(name=KUBERNETES_POOL, type="process"))
            client.update_global_concurrency_limit(
                "deploy-dev", GlobalConcurrencyLimitUpdate(limit=2)
            )
    try:
        with pytest.raises(ConfigError, match=r"elice-kubernetes exists with type 'process'"):
            ensure_setup(fresh_server)
        with temporary_settings(updates={PREFECT_API_URL: fresh_server}):
            with get_client(sync_client=True) as client:  # planned first: nothing written
                assert client.read_global_concurrency_limit_by_name("deploy-dev").limit == 2
    finally:
        with temporary_settings(updates={PREFECT_API_URL: fresh_server}):
            with get_client(sync_client=True) as client:
                client.delete_work_pool(KUBERNETES_POOL)
    ensure_setup(fresh_server)
    assert {c.action for c in ensure_setup(fresh_server, dry_run=True)} == {"unchanged"}


def test_setup_of_the_session_server_from_prefect_api_url() -> None:
    first = ensure_setup()
    assert by_kind(first)["deployment"] == DEPLOYMENTS
    again = ensure_setup()
    assert {c.action for c in again} == {"unchanged"}, [c for c in again if c.action != "unchanged"]
    with get_client(sync_client=True) as client:
        for name in ("ci/nightly-rebuild", "health-check/health-check"):
            deployment = client.read_deployment_by_name(name)
            assert not deployment.paused
            assert [s.active for s in deployment.schedules] == [True]


@pytest.mark.slow
def test_cli_setup_prints_the_changes(fresh_server: str) -> None:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """cicd"""

    register(app)
    result = CliRunner().invoke(app, ["setup", "--dry-run", "--api-url", fresh_server])
    assert result.exit_code == 0, result.output
    assert "dry run: nothing changed" in result.output
    assert "ci/nightly-rebuild" in result.output
    total = len(POOLS) + len(LIMITS) + len(BLOCKS) + len(DEPLOYMENTS) + 1  # + the automation
    assert f"would create 0, would update 0, {total} unchanged" in result.output

    bad = CliRunner().invoke(app, ["setup", "--api-url", "http://127.0.0.1:9/api"])
    assert bad.exit_code == 2
    assert "does not answer" in bad.output


GOOD = {"name": "x", "entrypoint": "flows/ci.py:ci", "work_pool": {"name": "p"}}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"deployments": [{**GOOD, "triggers": []}]},
            r"deployments\[0\]: \['triggers'\] not supported",
        ),
        (
            {"deployments": [{**GOOD, "entrypoint": "flows/nope.py:ci"}]},
            r"deployments\[0\]: entrypoint 'flows/nope.py:ci' cannot be loaded",
        ),
        (
            {"deployments": [{k: v for k, v in GOOD.items() if k != "work_pool"}]},
            r"deployments\[0\]: work_pool.name: field required",
        ),
        (
            {"deployments": [{**GOOD, "schedules": [{"every": 5}]}]},
            r"deployments\[0\]: schedules\[0\]: a schedule needs cron, interval or rrule",
        ),
        ({"build": [{"x": 1}], "deployments": []}, r"build: steps are not supported"),
        ({"deployments": [GOOD, GOOD]}, r"deployment names repeat: \['ci/x', 'ci/x'\]"),
    ],
)
def test_prefect_file_errors_name_the_deployment_and_field(
    tmp_path: Path, data: dict[str, Any], message: str
) -> None:
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message):
        read_prefect_file(path)


def test_the_checked_in_prefect_file_reads() -> None:
    specs = {s.full_name: s for s in read_prefect_file(REPO / "prefect.yaml")}
    assert set(specs) == DEPLOYMENTS
    assert specs["ci/ci"].parameters["deliver"] is True
    assert "properties" in specs["ci/ci"].parameter_openapi_schema


def test_a_block_saved_by_an_older_version_is_overwritten(
    fresh_server: str, config: PipelineConfig
) -> None:
    ensure_setup(fresh_server)
    with (
        temporary_settings(updates={PREFECT_API_URL: fresh_server}),
        get_client(sync_client=True) as client,
    ):
        document = client.read_block_document_by_name("elice-environments", "elice-environments")
        data = dict(document.data)
        old = [dict(e) for e in data["environments"]]
        old[-1]["approvers"] = ["someone"]  # a field this version refuses
        client.update_block_document(
            document.id, BlockDocumentUpdate(data={**data, "environments": old})
        )
    planned = {c.name: c.action for c in ensure_setup(fresh_server, dry_run=True)}
    assert planned["elice-environments"] == "update"
    ensure_setup(fresh_server)
    with temporary_settings(updates={PREFECT_API_URL: fresh_server}):
        envs = EnvironmentCatalog.load("elice-environments").environments
    assert envs == config.environments.environments


def test_setup_saves_the_clusters_kubeconfig_as_a_secret_that_reaches_the_cluster(
    fresh_server: str, tmp_path: Path
) -> None:
    with KubeSimulator() as sim:
        kubeconfig = sim.kubeconfig(tmp_path / "kubeconfig", context="elice-eks")
        planned = actions(ensure_setup(fresh_server, dry_run=True, kubeconfig=kubeconfig))
        assert planned[f"block:{KUBERNETES_TARGET_BLOCK}"] == "create"
        ensure_setup(fresh_server, kubeconfig=kubeconfig)
        again = actions(ensure_setup(fresh_server, dry_run=True, kubeconfig=kubeconfig))
        assert again[f"block:{KUBERNETES_TARGET_BLOCK}"] == "unchanged"
        with (
            temporary_settings(updates={PREFECT_API_URL: fresh_server}),
            get_client(sync_client=True) as client,
        ):
            # what the API and the UI show: the kubeconfig masked, the token nowhere
            document = client.read_block_document_by_name(
                KUBERNETES_TARGET_BLOCK, "elice-kubernetes-target", include_secrets=False
            )
            shown = httpx.get(f"{fresh_server}/block_documents/{document.id}", timeout=10).text
            assert sim.token is not None
            assert sim.token not in shown
            assert sim.token not in repr(document.data)
            cluster = KubernetesTarget.load(KUBERNETES_TARGET_BLOCK)
        assert isinstance(cluster.kubeconfig, SecretStr)
        assert cluster.context == "elice-eks"
        assert sim.token not in repr(cluster)
        # the saved block reaches the cluster with the kubeconfig's token
        namespaces = CoreV1Api(cluster.api_client()).list_namespace()
        assert namespaces.kind == "NamespaceList"


def test_a_kubeconfig_that_is_not_one_is_refused_naming_the_file_not_its_content(
    fresh_server: str, tmp_path: Path
) -> None:
    secretive = tmp_path / "kubeconfig"
    secretive.write_text("token: s3cr3t-value\n  : [\n")
    with pytest.raises(ConfigError) as caught:
        ensure_setup(fresh_server, dry_run=True, kubeconfig=secretive)
    assert f"{secretive}: the kubeconfig is not valid YAML" in str(caught.value)
    assert "s3cr3t" not in str(caught.value)
    with KubeSimulator() as sim:
        kubeconfig = sim.kubeconfig(tmp_path / "real", context="elice-eks")
        with pytest.raises(ConfigError, match="no context 'other'; it has elice-eks"):
            ensure_setup(fresh_server, dry_run=True, kubeconfig=kubeconfig, kube_context="other")

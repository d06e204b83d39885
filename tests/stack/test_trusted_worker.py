"""The worker runs only what prefect.yaml on the protected branch declares: attacks through the API.

Each attack is made the way anyone reaching the Prefect API can make it (a PATCH of a
deployment, a deployment created through the API, a run's parameters or job variables),
against a real server and the stack's real worker processes; none of them runs code. The
stack's two workers (dev and staging's on elice-process, production's on elice-production)
each refuse a run into an environment their trust file does not name.
"""

from __future__ import annotations

import json
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.settings import PREFECT_API_URL
from prefect.workers.process import ProcessWorker

from core.trust import TRUST_FILE_ENV, load_trust_roots, write_trust_roots
from reconcile.setup import PROCESS_POOL, PRODUCTION_POOL, ensure_setup
from stack.supervisor import alive
from stack.worker import (
    DEPLOY_WORKER,
    PRODUCTION_WORKER,
    WorkerRole,
    audit_log,
    ensure_worker,
    log_file,
    stop_worker,
    stop_workers,
    trust_file,
    worker_parts,
    worker_pid,
)
from tasks.deployment_check import LOCAL_ONLY, Declared, DeploymentFacts, differences
from tests.tasks.ci_checkout import snapshot_checkout

pytestmark = pytest.mark.slow  # the stack's real worker processes run each attack: minutes

SET_DIR = "prefect.deployments.steps.set_working_directory"


@pytest.fixture(scope="module")
def api_url() -> str:
    """The session's server, set up: pools, limits, blocks, prefect.yaml's deployments."""
    ensure_setup()
    return str(PREFECT_API_URL.value())


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workers' checkout: this tree, committed as `main` (its prefect.yaml is declared)."""
    return snapshot_checkout(tmp_path_factory.mktemp("checkout"))


@pytest.fixture(scope="module")
def worker_root(
    api_url: str, checkout: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """The stack's worker of dev and staging (`checkout` pinned, `main` protected)."""
    root = tmp_path_factory.mktemp("trusted") / "stack"
    ensure_worker(root, api_url, repo=checkout)
    try:
        yield root
    finally:
        stop_workers(root)


@pytest.fixture(scope="module")
def production_root(api_url: str, checkout: Path, worker_root: Path) -> Path:
    """The same stack with production's worker beside it (stopped with the other)."""
    ensure_worker(worker_root, api_url, PRODUCTION_WORKER, repo=checkout)
    return worker_root


def _final(run_id: uuid.UUID, timeout_s: float = 120) -> FlowRun:
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                return run
            assert time.monotonic() < deadline, f"still {run.state}"
            time.sleep(0.5)


def _audited(root: Path, role: WorkerRole = DEPLOY_WORKER) -> list[dict[str, Any]]:
    path = audit_log(root, role)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _refused(root: Path, run: FlowRun, *needles: str, role: WorkerRole = DEPLOY_WORKER) -> None:
    assert run.state is not None
    assert run.state.is_failed(), (run.state.type, run.state.message)
    message = run.state.message or ""
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    lines = _audited(root, role)
    [entry] = [e for e in lines if e["flow_run"] == str(run.id)]
    assert entry["kind"] == "refused"
    assert entry["reason"] == message
    with get_client(sync_client=True) as client:  # never Pending nor Running: nothing started
        history = [state.type for state in client.read_flow_run_states(run.id)]
    assert history == [StateType.SCHEDULED, StateType.FAILED], history


def _api(method: str, url: str, body: dict[str, Any]) -> httpx.Response:
    """A call anyone reaching the API can make. A 503 (the test server's SQLite busy on a
    loaded machine: Prefect's "retry this") is made again, as Prefect's own client does."""
    for _ in range(5):
        answer = httpx.request(method, url, json=body, timeout=30)
        if answer.status_code != httpx.codes.SERVICE_UNAVAILABLE:
            break
        time.sleep(1)
    return answer


def _create_run(api_url: str, deployment_id: uuid.UUID, body: dict[str, Any]) -> uuid.UUID:
    answer = _api("POST", f"{api_url}/deployments/{deployment_id}/create_flow_run", body)
    answer.raise_for_status()
    return uuid.UUID(answer.json()["id"])


def test_a_pull_step_rewritten_through_the_api_never_executes(
    api_url: str, worker_root: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("promote/promote")
    script = {"prefect.deployments.steps.run_shell_script": {"script": f"touch {marker}"}}
    try:
        patched = _api(
            "PATCH",
            f"{api_url}/deployments/{deployment.id}",
            {"pull_steps": [script, *(deployment.pull_steps or [])]},
        )
        assert patched.status_code == 204, patched.text
        run = _final(_create_run(api_url, deployment.id, {}))
        _refused(worker_root, run, "pull steps", "run_shell_script")
        time.sleep(2)  # had anything started it, the file would be there by now
        assert not marker.exists()
        assert "refused flow run" in (worker_root / "logs" / "worker.log").read_text()
    finally:
        ensure_setup()  # the reconciler puts the declared deployment back


def _evil_flow(tmp_path: Path, marker: Path) -> Path:
    code = tmp_path / "code"
    code.mkdir()
    (code / "evil.py").write_text(
        "from pathlib import Path\nfrom prefect import flow\n\n\n@flow\n"
        f"def evil() -> None:\n    Path({str(marker)!r}).touch()\n"
    )
    return code


def test_a_deployment_created_through_the_api_with_another_entrypoint_is_refused(
    api_url: str, worker_root: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    code = _evil_flow(tmp_path, marker)
    pull = [{SET_DIR: {"directory": str(code)}}]
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("evil")
        ids = [
            client.create_deployment(
                flow_id=flow_id,
                name=name,
                entrypoint="evil.py:evil",
                work_pool_name=PROCESS_POOL,
                pull_steps=pull,
            )
            for name in (f"evil-{uuid.uuid4().hex[:6]}", "health-check")
        ]
    try:
        unknown, borrowed = (_final(_create_run(api_url, i, {})) for i in ids)
        _refused(worker_root, unknown, "is not declared in prefect.yaml on main")
        _refused(worker_root, borrowed, "entrypoint", "evil.py:evil", "pull steps")
        assert not marker.exists()
    finally:
        with get_client(sync_client=True) as client:
            for deployment_id in ids:
                client.delete_deployment(deployment_id)


def test_a_ci_run_given_a_checkout_of_its_own_is_refused(
    api_url: str, worker_root: Path, tmp_path: Path
) -> None:
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("ci/ci")
    parameters = {"services": ["auth"], "deliver": True, "repo": str(tmp_path)}
    run = _final(_create_run(api_url, deployment.id, {"parameters": parameters}))
    _refused(worker_root, run, "parameters ['repo'] serve local development only")


def test_a_run_with_job_variables_of_its_own_is_refused(
    api_url: str, worker_root: Path, tmp_path: Path
) -> None:
    attacker = tmp_path / "trust.yaml"
    attacker.write_text("repository: /elsewhere\nenvironments: [production]\n")
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("promote/promote")
    body = {"job_variables": {"env": {TRUST_FILE_ENV: str(attacker)}}}
    run = _final(_create_run(api_url, deployment.id, body))
    _refused(worker_root, run, "the run sets job variables ['env']")


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(repo), *args],
        check=True,
        capture_output=True,
        env={
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@example.invalid",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@example.invalid",
            "PATH": "/usr/bin:/bin",
        },
    )


def test_a_declared_run_starts_and_sees_the_workers_trust_file_whatever_its_job_variables(
    api_url: str, tmp_path: Path
) -> None:
    """Even job variables the protected branch itself declares cannot replace the trust file."""
    pool = f"elice-probe-{uuid.uuid4().hex[:6]}"
    seen = tmp_path / "seen"
    attacker = tmp_path / "attacker.yaml"
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "probe.py").write_text(
        "import os\nfrom pathlib import Path\nfrom prefect import flow\n\n\n@flow\n"
        "def probe(note: str = '') -> None:\n"
        f"    Path({str(seen)!r}).write_text(os.environ[{TRUST_FILE_ENV!r}] + '|' + note)\n"
    )
    job_variables = {"env": {TRUST_FILE_ENV: str(attacker)}}
    pull = [{SET_DIR: {"directory": "{{ $ELICE_REPO }}"}}]
    prefect_yaml = {
        "name": "probe",
        "pull": pull,
        "deployments": [
            {
                "name": "probe",
                "entrypoint": "probe.py:probe",
                "work_pool": {"name": pool, "job_variables": job_variables},
            }
        ],
    }
    (repo / "prefect.yaml").write_text(json.dumps(prefect_yaml))
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "probe")
    with get_client(sync_client=True) as client:
        client.create_work_pool(
            WorkPoolCreate(
                name=pool,
                type="process",
                base_job_template=ProcessWorker.get_default_base_job_template(),
            )
        )
        deployment_id = client.create_deployment(
            flow_id=client.create_flow_from_name("probe"),
            name="probe",
            entrypoint="probe.py:probe",
            work_pool_name=pool,
            pull_steps=pull,
            job_variables=job_variables,
        )
    root = tmp_path / "stack"
    ensure_worker(root, api_url, WorkerRole("worker", pool, ("dev",)), repo=repo)
    try:
        assert load_trust_roots(trust_file(root)).repository == str(repo.resolve())
        run = _final(_create_run(api_url, deployment_id, {"parameters": {"note": "ran"}}))
        assert run.state is not None
        assert run.state.is_completed(), run.state.message
        assert seen.read_text() == f"{trust_file(root).resolve()}|ran"
    finally:
        stop_worker(root)
        with get_client(sync_client=True) as client:
            client.delete_deployment(deployment_id)
            client.delete_work_pool(pool)


@pytest.mark.stack
def test_a_production_run_on_the_dev_and_staging_pool_is_refused_and_never_runs(
    api_url: str, production_root: Path
) -> None:
    """Asked through the API to promote into production on elice-process (a deployment
    the protected branch declares, a parameter its flow takes), the dev/staging worker
    refuses; production's worker never sees a run of another pool."""
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("promote/promote")
    body = {"parameters": {"environment": "production", "promoted_by": "mallory"}}
    run = _final(_create_run(api_url, deployment.id, body))
    _refused(
        production_root,
        run,
        "deployment 'promote' refused",
        "environment 'production' is not one this worker deploys into (dev, staging)",
    )
    assert _audited(production_root, PRODUCTION_WORKER) == []
    assert str(run.id) not in log_file(production_root, PRODUCTION_WORKER).read_text()


@pytest.mark.stack
def test_production_refuses_another_environment_and_runs_its_health_check(
    api_url: str, production_root: Path
) -> None:
    with get_client(sync_client=True) as client:
        health = client.read_deployment_by_name("health-check/health-check")
        promote = client.read_deployment_by_name("promote/promote-production")
    assert (health.work_pool_name, promote.work_pool_name) == (PRODUCTION_POOL, PRODUCTION_POOL)
    staging = _final(_create_run(api_url, promote.id, {"parameters": {"environment": "staging"}}))
    _refused(
        production_root,
        staging,
        "environment 'staging' is not one this worker deploys into (production)",
        role=PRODUCTION_WORKER,
    )
    # its own run: started (Pending, Running) by production's worker, with its trust file;
    # it ends as the health of production is (this session deployed nothing there)
    run = _final(_create_run(api_url, health.id, {}))
    with get_client(sync_client=True) as client:
        history = [state.type for state in client.read_flow_run_states(run.id)]
    assert StateType.RUNNING in history, (history, run.state)
    assert run.state is not None
    # past its own check of the trust file, to the health of production
    message = run.state.message or ""
    assert run.state.is_completed() or "EnvironmentUnhealthy: production:" in message, message
    assert run.work_pool_name == PRODUCTION_POOL
    assert str(run.id) in log_file(production_root, PRODUCTION_WORKER).read_text()
    assert str(run.id) not in log_file(production_root).read_text()
    assert not [e for e in _audited(production_root) if e["flow_run"] == str(run.id)]


@pytest.mark.stack
def test_the_supervisor_lists_and_stops_both_workers(
    api_url: str, checkout: Path, production_root: Path
) -> None:
    """Last in the module: it ends the module's workers.

    Each has its own pid file, log, owner-only trust file and name; a worker whose trust
    file pins other environments (a stack from before the split) is replaced, not reused.
    """
    deploy_pid = worker_pid(production_root)
    production_pid = worker_pid(production_root, PRODUCTION_WORKER)
    assert deploy_pid is not None
    assert production_pid is not None
    assert deploy_pid != production_pid
    parts = {p.name: (p.state, p.address) for p in worker_parts(production_root)}
    assert parts == {
        "worker": ("running", PROCESS_POOL),
        "worker-production": ("running", PRODUCTION_POOL),
    }
    for role in (DEPLOY_WORKER, PRODUCTION_WORKER):
        path = trust_file(production_root, role)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert load_trust_roots(path).environments == role.environments
    reused = ensure_worker(production_root, api_url, PRODUCTION_WORKER, repo=checkout)
    assert reused == production_pid

    old = load_trust_roots(trust_file(production_root))
    widened = old.model_copy(update={"environments": ("dev", "staging", "production")})
    write_trust_roots(trust_file(production_root), widened)
    replaced = ensure_worker(production_root, api_url, repo=checkout)
    assert replaced != deploy_pid
    assert not alive(deploy_pid)
    assert load_trust_roots(trust_file(production_root)) == old

    assert stop_workers(production_root) == ["worker", "worker-production"]
    assert {p.name: p.state for p in worker_parts(production_root)} == {}
    assert not alive(replaced)
    assert not alive(production_pid)
    assert stop_workers(production_root) == []


def _facts(**changes: Any) -> DeploymentFacts:
    base: dict[str, Any] = {
        "name": "ci",
        "entrypoint": "flows/ci.py:ci",
        "pull_steps": [{SET_DIR: {"directory": "{{ $ELICE_REPO }}"}}],
        "job_variables": {"env": {"PREFECT_LOGGING_LEVEL": "INFO"}},
        "parameters": {"deliver": True},
        "work_pool": "elice-process",
        "work_queue": "default",
    }
    return DeploymentFacts(**(base | changes))


def test_differences_name_each_field_that_differs() -> None:
    declared = Declared(_facts(), frozenset({"services", "deliver"}))
    asked = {"services": ["auth"], "config_source": None}  # None: the default, asks nothing
    assert differences(declared, _facts(), asked, None, "elice-process") == []
    found = differences(
        declared,
        _facts(parameters={"deliver": False}, work_pool="other", work_queue="q"),
        {"services": [], "config_source": "x.yaml", "evil": 1},
        {"command": "sh"},
        "elice-process",
    )
    assert [line.split(" ", 2)[:2] for line in found] == [
        ["default", "parameters"],
        ["work", "pool"],
        ["work", "queue"],
        ["work", "pool"],
        ["the", "run"],
        ["parameters", "['config_source']"],
        ["parameters", "['evil']"],
    ]
    assert {"repo", "config_source", "drill_env"} == LOCAL_ONLY

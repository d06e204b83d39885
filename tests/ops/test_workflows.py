""".github/workflows: schema-valid, least-privilege, and calling deployments that exist."""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS_DIR = REPO / ".github" / "workflows"
WORKFLOWS = sorted([*WORKFLOWS_DIR.glob("*.yml"), *WORKFLOWS_DIR.glob("*.yaml")])
CI_YML = WORKFLOWS_DIR / "ci.yml"
PREFECT_YAML = REPO / "prefect.yaml"
YAMLLINT = (
    "{extends: default, rules: {document-start: disable, line-length: {max: 120},"
    " truthy: {check-keys: false}}}"
)
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} not found on PATH (run the tests with `uv run pytest`)"
    return path


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited {proc.returncode}\n"
        f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )
    return proc


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    # YAML 1.1 reads the bare key `on` as True.
    if True in data:
        data["on"] = data.pop(True)
    return data


def steps(workflow: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(job_id, s) for job_id, job in workflow["jobs"].items() for s in job.get("steps", [])]


def deployment_runs(job: dict[str, Any]) -> list[list[str]]:
    """The argv of every `prefect deployment run` in a job's run steps."""
    found = []
    for step in job.get("steps", []):
        argv = shlex.split(step.get("run", ""))
        found.extend(
            argv[i:]
            for i in range(len(argv) - 2)
            if argv[i : i + 3] == ["prefect", "deployment", "run"]
        )
    return found


def params(argv: list[str]) -> dict[str, str]:
    pairs = [argv[i + 1] for i, a in enumerate(argv) if a in {"--param", "-p"}]
    return dict(p.split("=", 1) for p in pairs)


def test_there_are_workflows() -> None:
    assert CI_YML in WORKFLOWS


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_the_github_schema(workflow: Path) -> None:
    proc = run(tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", workflow)
    assert "ok -- validation done" in proc.stdout


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_passes_yamllint(workflow: Path) -> None:
    run(tool("yamllint"), "--strict", "-d", YAMLLINT, workflow)


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_actions_are_pinned_to_commit_shas(workflow: Path) -> None:
    for job_id, step in steps(load(workflow)):
        if "uses" in step:
            assert PINNED.match(step["uses"]), f"{job_id}: {step['uses']} is not pinned to a SHA"


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_least_privilege(workflow: Path) -> None:
    data = load(workflow)
    assert data["permissions"] == {"contents": "read"}
    for job_id, job in data["jobs"].items():
        granted = job.get("permissions", {})
        assert "write" not in str(granted), f"{job_id} asks for write: {granted}"
        for step in job.get("steps", []):
            if step.get("uses", "").startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] is False, job_id


def test_triggers_and_concurrency() -> None:
    data = load(CI_YML)
    on = data["on"]
    assert on["pull_request"]["branches"] == ["main"]
    assert on["push"]["branches"] == ["main"]
    env_input = on["workflow_dispatch"]["inputs"]["environment"]
    assert env_input["type"] == "choice"
    assert env_input["default"] == "staging"
    assert set(env_input["options"]) == {"staging", "production"}
    assert "github.ref" in data["concurrency"]["group"]


def test_prefect_api_comes_from_secrets() -> None:
    env = load(CI_YML)["env"]
    assert env["PREFECT_API_URL"] == "${{ secrets.PREFECT_API_URL }}"
    assert env["PREFECT_API_KEY"] == "${{ secrets.PREFECT_API_KEY }}"
    assert env["PREFECT_API_AUTH_STRING"] == "${{ secrets.PREFECT_API_AUTH_STRING }}"


def test_ci_job_runs_ci_deployment_with_repository_ref_base_and_head() -> None:
    job = load(CI_YML)["jobs"]["ci"]
    (argv,) = deployment_runs(job)
    assert argv[3] == "ci/ci"
    assert "--watch" in argv
    assert params(argv) == {
        "repository": '"${REPOSITORY}"',
        "ref": '"${GIT_REF}"',
        "base": '"${BASE_SHA}"',
        "head": '"${HEAD_SHA}"',
    }
    (step,) = [s for s in job["steps"] if "prefect deployment run" in s.get("run", "")]
    assert step["run"].startswith("uv run prefect deployment run")
    assert "pull_request.base.sha" in step["env"]["BASE_SHA"]
    assert "github.event.before" in step["env"]["BASE_SHA"]
    assert "pull_request.head.sha" in step["env"]["HEAD_SHA"]
    assert "github.sha" in step["env"]["HEAD_SHA"]
    assert step["env"]["REPOSITORY"] == "${{ github.repository }}"
    assert step["env"]["GIT_REF"] == "${{ github.ref }}"


def test_promote_job_runs_after_ci_on_main_or_by_hand() -> None:
    job = load(CI_YML)["jobs"]["promote"]
    assert job["needs"] == "ci"
    assert "github.event_name == 'push'" in job["if"]
    assert "needs.ci.result == 'success'" in job["if"]
    assert "github.event_name == 'workflow_dispatch'" in job["if"]
    (argv,) = deployment_runs(job)
    assert argv[3] == "${DEPLOYMENT}"
    assert "--watch" in argv
    assert params(argv) == {
        "environment": "${TARGET_ENVIRONMENT}",
        "promoted_by": '"${PROMOTER}"',
        "request": "$(jq .request ${RUNNER_TEMP}/request.json)",
        "request_signature": "$(jq .request_signature ${RUNNER_TEMP}/request.json)",
    }
    # the request is signed by the workflow's key for the person who triggered it
    (sign,) = [s for s in job["steps"] if "cicd request" in s.get("run", "")]
    assert '--actor "$PROMOTER"' in sign["run"]
    assert sign["env"]["PROMOTE_KEY"] == "${{ secrets.ELICE_PROMOTE_KEY }}"
    assert sign["env"]["PROMOTER"] == "${{ github.actor }}"
    (step,) = [s for s in job["steps"] if "prefect deployment run" in s.get("run", "")]
    assert step["env"]["TARGET_ENVIRONMENT"] == "${{ inputs.environment || 'staging' }}"
    # production's own deployment (its own pool and worker); staging's otherwise
    assert deployment_names(step) == {
        "production": "promote/promote-production",
        "staging": "promote/promote",
    }
    # the person who triggered the workflow promotes, never a shared bot name
    assert step["env"]["PROMOTER"] == "${{ github.actor }}"


# --- the deployments named exist in prefect.yaml and take the parameters passed -------


def flow_signature(entrypoint: str) -> tuple[str, set[str]]:
    """(flow name, parameter names) of ``path.py:function``, read without importing it."""
    path, _, func = entrypoint.partition(":")
    source = REPO / path
    assert source.is_file(), f"entrypoint {entrypoint}: {path} does not exist"
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == func:
            name = func.replace("_", "-")
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call):
                    for kw in deco.keywords:
                        if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                            name = str(kw.value.value)
            args = node.args
            names = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}
            return name, names
    pytest.fail(f"entrypoint {entrypoint}: no function {func} in {path}")


def deployment_names(step: dict[str, Any]) -> dict[str, str]:
    """The deployment a step's `DEPLOYMENT` names, by the dispatch input `environment`:
    `${{ inputs.environment == 'E' && 'A' || 'B' }}` is A for E, else B."""
    expression = str(step["env"]["DEPLOYMENT"]).strip()
    found = re.fullmatch(
        r"\$\{\{ inputs\.environment == '(\w+)' && '([\w/-]+)' \|\| '([\w/-]+)' \}\}",
        expression,
    )
    assert found, f"DEPLOYMENT: {expression!r} is not the expression the test knows"
    environment, then, otherwise = found.groups()
    return {environment: then, "staging": otherwise}


def prefect_deployments() -> dict[str, set[str]]:
    """``flow/deployment`` -> the flow's parameter names, for every deployment in prefect.yaml."""
    assert PREFECT_YAML.is_file(), "prefect.yaml is missing: the workflow's deployments live there"
    found = {}
    for deployment in yaml.safe_load(PREFECT_YAML.read_text(encoding="utf-8"))["deployments"]:
        flow_name, parameters = flow_signature(deployment["entrypoint"])
        found[f"{flow_name}/{deployment['name']}"] = parameters
    return found


@pytest.mark.parametrize("job_id", ["ci", "promote"])
def test_workflow_deployments_exist_and_accept_the_params(job_id: str) -> None:
    deployments = prefect_deployments()
    job = load(CI_YML)["jobs"][job_id]
    (argv,) = deployment_runs(job)
    names = {argv[3]}
    if argv[3] == "${DEPLOYMENT}":
        (step,) = [s for s in job["steps"] if "prefect deployment run" in s.get("run", "")]
        names = set(deployment_names(step).values())
    for name in names:
        assert name in deployments, f"{name} is not in prefect.yaml: {sorted(deployments)}"
        unknown = set(params(argv)) - deployments[name]
        assert not unknown, f"{name} has no parameters {unknown}"

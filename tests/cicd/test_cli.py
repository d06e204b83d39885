"""The `cicd` command line: status from the ledger, and clear errors before any work.

Read commands never start a temporary Prefect server of their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from blocks.stack import StackInfo, save_stack_info
from cicd.cli import app
from core.records import ImageRef
from stack.ports import free_port
from tasks.releases import ReleaseRecord
from tests.ledgers import current_ledger

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _config_with_environment(tmp_path: Path, name: str) -> Path:
    data = yaml.safe_load((REPO / "config" / "pipeline.yaml").read_text())
    data["environments"] = [
        {
            "name": name,
            "namespace": f"elice-{name}",
            "replicas": {"min": 1, "max": 2},
            "log_level": "INFO",
            "storage": "minio",
            "local_port_offset": 36000,
        }
    ]
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


CICD = Path(sys.executable).with_name("cicd")


def _record_auth(environment: str, digest: str) -> None:
    current_ledger().record_deploy(
        environment,
        ReleaseRecord(
            service="auth",
            environment=environment,
            image=ImageRef(
                service="auth",
                repository="127.0.0.1:5000/elice/auth",
                digest=digest,
                version="0.1.0-abc",
                commit="a" * 40,
            ),
            release_id="ci-0.1.0-abc",
            verified=True,
        ),
    )


def test_status_json_reports_release_digest_address_and_state(tmp_path) -> None:
    config = _config_with_environment(tmp_path, "cli-status")
    digest = "sha256:" + "ab" * 32
    _record_auth("cli-status", digest)
    result = runner.invoke(app, ["status", "--json", "--config", str(config)])
    assert result.exit_code == 0, result.output
    rows = {row["service"]: row for row in json.loads(result.output)}
    assert len(rows) == 12
    assert rows["auth"]["digest"] == digest
    assert rows["auth"]["state"] == "verified"
    assert rows["auth"]["release"] == "ci-0.1.0-abc"
    assert rows["auth"]["address"] == "http://127.0.0.1:44002"
    assert rows["course"]["state"] == "absent"
    assert rows["course"]["digest"] is None

    table = runner.invoke(app, ["status", "--config", str(config)])
    assert table.exit_code == 0
    assert "verified" in table.output
    assert "absent" in table.output


def test_unknown_service_is_refused_before_any_work() -> None:
    result = runner.invoke(app, ["ci", "--services", "auth,billing"])
    assert result.exit_code == 2
    assert "unknown services ['billing']" in result.output


def test_invalid_configuration_file_is_named(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("services: []\nenvironments: []\nextra: 1\n")
    result = runner.invoke(app, ["status", "--config", str(bad)])
    assert result.exit_code == 2
    assert "bad.yaml" in result.output
    assert "unknown top-level keys ['extra']" in result.output


def test_health_of_an_unknown_environment_is_refused() -> None:
    result = runner.invoke(app, ["health", "qa"])
    assert result.exit_code == 2
    assert "unknown environment 'qa'" in result.output


def test_register_blocks_saves_the_configuration() -> None:
    result = runner.invoke(app, ["register-blocks"])
    assert result.exit_code == 0, result.output
    assert "elice-services" in result.output
    listed = runner.invoke(app, ["status", "--json", "--config", "blocks", "--environment", "dev"])
    assert listed.exit_code == 0, listed.output
    assert len(json.loads(listed.output)) == 12


def test_audit_of_an_unknown_environment_is_refused() -> None:
    result = runner.invoke(app, ["audit", "qa"])
    assert result.exit_code == 2
    assert "unknown environment 'qa'" in result.output
    assert "approval audit" not in result.output


def test_status_of_an_unknown_environment_is_one_line_and_exit_2() -> None:
    result = runner.invoke(app, ["status", "--environment", "qa"])
    assert result.exit_code == 2
    assert "unknown environment 'qa'" in result.output
    assert "Traceback" not in result.output


def test_ci_with_a_ref_that_is_no_commit_is_refused_before_any_work() -> None:
    result = runner.invoke(app, ["ci", "--base", "deadbeef"])
    assert result.exit_code == 2
    assert "'deadbeef' is not a commit" in result.output
    assert "Traceback" not in result.output


def test_ci_of_an_unknown_environment_is_refused_before_any_work() -> None:
    result = runner.invoke(app, ["ci", "--all", "--environment", "qa"])
    assert result.exit_code == 2
    assert "unknown environment 'qa'" in result.output


def test_a_target_other_than_the_configured_one_is_refused() -> None:
    result = runner.invoke(app, ["status", "--target", "nomad"])
    assert result.exit_code == 2
    assert "dev deploys to its configured target 'docker', not 'nomad'" in result.output


@pytest.mark.parametrize("stack_record", [False, True], ids=["no-stack", "stack-server-down"])
def test_status_json_as_a_process_starts_no_prefect_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stack_record: bool
) -> None:
    """`cicd status --json` with no Prefect API configured, and with a stack record naming a
    server that no longer answers: valid JSON from the ledger, no temporary server."""
    state, stack = tmp_path / "state", tmp_path / "stack"
    monkeypatch.setenv("ELICE_STATE_DIR", str(state))
    digest = "sha256:" + "cd" * 32
    _record_auth("dev", digest)
    if stack_record:
        gone = f"http://127.0.0.1:{free_port()}/api"
        info = StackInfo(
            docker_host="unix:///nonexistent.sock",
            registry="127.0.0.1:5000",
            base_image="localhost/python-base:3.11",
            prefect_api_url=gone,
        )
        stack.mkdir()
        save_stack_info(info, stack)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(ELICE_STATE_DIR=str(state), ELICE_STACK_DIR=str(stack), ELICE_CONFIG="")
    done = subprocess.run(
        [str(CICD), "status", "--json"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Starting temporary server" not in done.stderr + done.stdout
    assert "telemetry" not in done.stderr.lower()
    rows = json.loads(done.stdout)
    assert len(rows) == 36  # 12 services in dev, staging and production
    auth = next(r for r in rows if r["environment"] == "dev" and r["service"] == "auth")
    assert (auth["digest"], auth["state"]) == (digest, "verified")

"""`cicd status` as a user runs it (the installed console script), and its light path:
the rows from the configuration file and the ledger, without importing Prefect."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from blocks.catalog import ServiceCatalog
from blocks.docker_target import DockerTarget
from blocks.environments import EnvironmentCatalog
from core.catalog import DOCKER_TARGET_TYPE
from core.config import CATALOG_BLOCK_TYPE, ENVIRONMENTS_BLOCK_TYPE
from core.records import ImageRef
from tasks.releases import ReleaseRecord
from tests.cicd.light_cli import heavy_of, probe_cicd, run_cicd, user_env
from tests.ledgers import current_ledger


@pytest.fixture(autouse=True)
def own_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's own ledger (the session's holds other modules' records)."""
    monkeypatch.setenv("ELICE_STATE_DIR", str(tmp_path / "state"))


def _record(environment: str, service: str, digest: str, *, verified: bool) -> ReleaseRecord:
    record = ReleaseRecord(
        service=service,
        environment=environment,
        image=ImageRef(
            service=service,
            repository=f"127.0.0.1:5000/elice/{service}",
            digest=digest,
            version="0.2.0-light",
            commit="c" * 40,
        ),
        release_id=f"rel-{service}",
        verified=verified,
    )
    current_ledger().record_deploy(environment, record)
    return record


def _cicd(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cicd(user_env(tmp_path), *args, cwd=tmp_path)


def test_status_json_and_table_from_the_console_script(tmp_path: Path) -> None:
    auth = _record("staging", "auth", "sha256:" + "1a" * 32, verified=True)
    media = _record("staging", "media", "sha256:" + "2b" * 32, verified=False)
    done = _cicd(tmp_path, "status", "--json", "--environment", "staging")
    assert done.returncode == 0, done.stderr
    rows = {row["service"]: row for row in json.loads(done.stdout)}
    assert len(rows) == 12
    assert rows["auth"] == {
        "environment": "staging",
        "service": "auth",
        "release": "rel-auth",
        "digest": auth.image.digest,
        "version": "0.2.0-light",
        "address": "http://127.0.0.1:28002",
        "state": "verified",
        "deployed_at": auth.deployed_at.isoformat(),
    }
    assert (rows["media"]["state"], rows["media"]["digest"]) == ("deployed", media.image.digest)
    assert rows["course"]["state"] == "absent"
    assert rows["course"]["release"] is None
    table = _cicd(tmp_path, "status", "--environment", "staging")
    assert table.returncode == 0, table.stderr
    line = next(x for x in table.stdout.splitlines() if " auth " in x)
    for cell in ("staging", "verified", "rel-auth", "1a1a1a1a1a1a", "http://127.0.0.1:28002"):
        assert cell in line


def test_status_bad_input_is_refused_as_before(tmp_path: Path) -> None:
    unknown = _cicd(tmp_path, "status", "--environment", "qa")
    assert unknown.returncode == 2
    assert "unknown environment 'qa'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    target = _cicd(tmp_path, "status", "--target", "nomad")
    assert target.returncode == 2
    assert "dev deploys to its configured target 'docker', not 'nomad'" in target.stderr
    option = _cicd(tmp_path, "status", "--bogus")
    assert option.returncode == 2
    assert "No such option: --bogus" in option.stderr


def test_status_imports_no_prefect(tmp_path: Path) -> None:
    """The console script's status entry, run in a process that then lists its modules."""
    done = probe_cicd(user_env(tmp_path), "status", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)) == 36
    assert heavy_of(done) == [], done.stderr


def test_the_light_path_names_the_blocks_as_prefect_does() -> None:
    """The slugs the light path reads saved blocks by are the blocks' own."""
    assert ServiceCatalog.get_block_type_slug() == CATALOG_BLOCK_TYPE
    assert EnvironmentCatalog.get_block_type_slug() == ENVIRONMENTS_BLOCK_TYPE
    assert DockerTarget.get_block_type_slug() == DOCKER_TARGET_TYPE

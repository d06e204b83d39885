"""`cicd health` as a user runs it (the installed console script), against a real service:
the health-check flow's verdicts without Prefect, and nothing written."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cicd import health_cli
from core.records import HealthResult, ImageRef
from core.settings import Settings
from tasks.releases import ReleaseRecord
from tests.cicd.light_cli import heavy_modules, run_cicd, user_env
from tests.ledgers import current_ledger
from tests.tasks.servicekit_server import DIGEST_A, DIGEST_B, servicekit_server


def _record(env: str, digest: str) -> None:
    image = ImageRef(service="probe", repository="127.0.0.1:5000/elice/probe", digest=digest)
    record = ReleaseRecord(service="probe", environment=env, image=image, release_id="r-light")
    current_ledger().record_deploy(env, record)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """The real servicekit app `probe` on DIGEST_A, for staging and for production."""
    folder = tmp_path_factory.mktemp("health-light")
    with (
        servicekit_server(folder / "stg", {"ENVIRONMENT": "staging"}) as stg,
        servicekit_server(folder / "prod", {"ENVIRONMENT": "production"}) as url,
    ):
        ports = {"staging": int(stg.rsplit(":", 1)[1]), "production": int(url.rsplit(":", 1)[1])}
        base = max(1024, max(ports.values()) - 40000)
        envs = [
            {
                "name": name,
                "namespace": f"hl-{name}",
                "replicas": {"min": 1, "max": 1},
                "log_level": "INFO",
                "storage": "minio",
                "local_port_offset": ports[name] - base if name in ports else 0,
            }
            for name in ("dev", "staging", "production")
        ]
        config = folder / "pipeline.yaml"
        data = {"services": [{"name": "probe", "port": base}], "environments": envs}
        config.write_text(yaml.safe_dump(data), encoding="utf-8")
        yield config, url


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Production records the digest `probe` runs, staging another; dev nothing."""
    monkeypatch.setenv("ELICE_STATE_DIR", str(tmp_path / "state"))
    _record("production", DIGEST_A)
    _record("staging", DIGEST_B)
    return user_env(tmp_path)


def _ledger_files(env: dict[str, str]) -> dict[str, bytes]:
    state = Path(env["ELICE_STATE_DIR"])
    return {str(p): p.read_bytes() for p in sorted(state.rglob("*")) if p.is_file()}


def test_healthy_and_unhealthy_as_the_flow_says(
    env: dict[str, str], served: tuple[Path, str]
) -> None:
    config, url = served
    before = _ledger_files(env)
    done = run_cicd(env, "health", "prod", "--json", "--config", str(config))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["environment"], report["ok"], report["message"]) == ("production", True, "")
    assert [(s["service"], s["url"], s["ok"]) for s in report["services"]] == [("probe", url, True)]
    table = run_cicd(env, "health", "production", "--config", str(config))
    assert table.returncode == 0, table.stderr
    assert "production: 1 services healthy" in table.stdout
    sick = run_cicd(env, "health", "stg", "--json", "--deadline", "1", "--config", str(config))
    assert sick.returncode == 1, sick.stderr
    report = json.loads(sick.stdout)
    [probe] = report["services"]
    assert probe["failures"] == [f"/version: digest {DIGEST_A}, expected {DIGEST_B}"]
    assert probe["attempts"] >= 2
    assert report["message"].startswith("staging: unhealthy: probe (/version: digest")
    empty = run_cicd(env, "health", "dev", "--config", str(config))
    assert empty.returncode == 1
    assert "dev: nothing deployed: the ledger records no release" in empty.stderr
    assert _ledger_files(env) == before  # a read: nothing written


def test_bad_input_is_exit_2_before_any_probe(
    env: dict[str, str], served: tuple[Path, str]
) -> None:
    config = str(served[0])
    for args, said in (
        (("qa",), "unknown environment 'qa'"),
        (("prod", "--services", "probe,nosuch"), "nosuch"),
        (("prod", "--deadline", "0"), "--deadline"),
    ):
        done = run_cicd(env, "health", *args, "--config", config)
        assert done.returncode == 2, (args, done.stderr)
        assert said in done.stderr
        assert "Traceback" not in done.stderr


def test_health_imports_no_prefect(env: dict[str, str], served: tuple[Path, str]) -> None:
    code, out, heavy = heavy_modules(env, "health", "prod", "--json", "--config", str(served[0]))
    assert code == 0
    assert json.loads(out)["ok"] is True
    assert heavy == []


def test_the_full_path_reports_as_the_light_one(
    env: dict[str, str], served: tuple[Path, str]
) -> None:
    """The path a trust file, the storage block or the kubernetes target take (Prefect's
    blocks, the environment's deployer) gives the same verdicts."""
    settings = Settings.from_environ()
    config = str(served[0])
    for environment in ("prod", "stg", "dev"):
        light = health_cli._light(settings, config, environment, None, 1.0)
        full = health_cli._full(settings, config, environment, None, 1.0)
        assert [_verdict(r) for r in full[0].results] == [_verdict(r) for r in light[0].results]
        assert (full[0].environment, full[0].ok) == (light[0].environment, light[0].ok)
        assert full[1].split(" (")[0] == light[1].split(" (")[0]


def _verdict(result: HealthResult) -> tuple[str, str, bool, list[str]]:
    return result.service, result.url, result.ok, result.failures

"""`cicd metrics` as a user runs it (the installed console script): the same metrics the
flows compute from the same ledger, bad input refused, and no Prefect imported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.records import ImageRef
from tasks.metrics import environment_metrics, git_commit_times, prometheus_text
from tasks.releases import ReleaseRecord
from tests.cicd.light_cli import heavy_modules, run_cicd, user_env
from tests.ledgers import current_ledger


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This test's own ledger: two deploys of `auth` into dev; a user's shell."""
    monkeypatch.setenv("ELICE_STATE_DIR", str(tmp_path / "state"))
    for n, digest in enumerate(("ab", "cd")):
        image = ImageRef(
            service="auth",
            repository="127.0.0.1:5000/elice/auth",
            digest="sha256:" + digest * 32,
            commit="0" * 40,  # no such commit: no lead time, as git says
        )
        record = ReleaseRecord(
            service="auth", environment="dev", image=image, release_id=f"rel-{n}", verified=True
        )
        current_ledger().record_deploy("dev", record)
    return user_env(tmp_path)


def test_metrics_json_and_prometheus_are_the_flows_own(env: dict[str, str]) -> None:
    done = run_cicd(env, "metrics", "--json", "--environment", "dev,staging")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["environment"] for r in rows] == ["dev", "staging"]
    assert (rows[0]["deployments"], rows[1]["deployments"]) == (2, 0)
    expected = environment_metrics(
        ["dev", "staging"], ledger=current_ledger(), commit_times=git_commit_times()
    )
    for row, mine in zip(rows, expected, strict=True):
        row.pop("since"), row.pop("until")  # the window ends when each was computed
        assert row == {
            k: v for k, v in mine.model_dump(mode="json").items() if k not in ("since", "until")
        }
    text = run_cicd(env, "metrics", "--prometheus", "--environment", "dev")
    assert text.returncode == 0, text.stderr
    assert text.stdout == prometheus_text(expected[:1])
    table = run_cicd(env, "metrics")
    assert table.returncode == 0, table.stderr
    assert "Delivery metrics, last 30 days" in table.stdout


def test_metrics_bad_input_is_exit_2(env: dict[str, str]) -> None:
    for args, said in (
        (("--environment", "qa"), "unknown environment 'qa'"),
        (("--days", "0"), "--days must be positive"),
        (("--json", "--prometheus"), "--json and --prometheus exclude each other"),
    ):
        done = run_cicd(env, "metrics", *args)
        assert done.returncode == 2, (args, done.stderr)
        assert said in done.stderr
        assert "Traceback" not in done.stderr


def test_metrics_imports_no_prefect(env: dict[str, str]) -> None:
    code, out, heavy = heavy_modules(env, "metrics", "--json")
    assert code == 0
    assert len(json.loads(out)) == 3
    assert heavy == []

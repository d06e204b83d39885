"""Delivery metrics from a real ledger on disk, commit times from a real git repository."""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prefect.filesystems import LocalFileSystem
from prometheus_client.parser import text_string_to_metric_families

from blocks.storage import ledger_filesystem
from core.records import ImageRef, PlannedChange, SecurityVerdict, StageResult, make_plan
from core.settings import Settings
from tasks.metrics import (
    GAUGES,
    DeliveryMetrics,
    cache_hit_ratio,
    delivery_events,
    delivery_metrics,
    environment_metrics,
    git_commit_times,
    metrics_markdown,
    prometheus_text,
    stage_metrics,
)
from tasks.releases import (
    DeployIntent,
    Ledger,
    ReleaseRecord,
    promoted_state,
    with_intent,
    without_intent,
)
from tests.ledgers import current_ledger
from tests.monitoring.tools import tool

REPO = Path(__file__).resolve().parents[2]
COMMIT_AGE = timedelta(days=2, hours=3)


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(LocalFileSystem(basepath=str(tmp_path / "ledger")))


@pytest.fixture
def commits(tmp_path: Path) -> tuple[Path, list[str], datetime]:
    """A git repository with three commits made COMMIT_AGE ago."""
    repo = tmp_path / "repo"
    repo.mkdir()
    when = (datetime.now(UTC) - COMMIT_AGE).replace(microsecond=0)
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "a",
        "GIT_AUTHOR_EMAIL": "a@example.invalid",
        "GIT_COMMITTER_NAME": "a",
        "GIT_COMMITTER_EMAIL": "a@example.invalid",
        "GIT_AUTHOR_DATE": when.isoformat(),
        "GIT_COMMITTER_DATE": when.isoformat(),
    }
    git = [tool("git"), "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True, env=env)
    shas = []
    for n in range(3):
        subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", f"c{n}"], check=True, env=env)
        done = subprocess.run(
            [*git, "rev-parse", "HEAD"], check=True, env=env, capture_output=True, text=True
        )
        shas.append(done.stdout.strip())
    return repo, shas, when


def image(service: str, n: int, commit: str) -> ImageRef:
    return ImageRef(
        service=service,
        repository=f"127.0.0.1:5000/elice/{service}",
        digest="sha256:" + f"{n:x}" * 64,
        commit=commit,
    )


def promote(
    ledger: Ledger, env: str, run: str, images: dict[str, ImageRef], *, outcome: str
) -> str:
    """Write what a promotion writes: its intent, then its record or its rollback."""
    current = ledger.current(env)
    changes = [
        PlannedChange(
            service=name,
            current_digest=current.services[name].image.digest
            if name in current.services
            else None,
            image=img,
            ref="refs/heads/main",
            commit=img.commit,
        )
        for name, img in images.items()
    ]
    plan = make_plan(env, "staging", changes, "alice")
    intent = DeployIntent(
        release_id=plan.release_id,
        flow_run_id=run,
        images=images,
        previous=dict.fromkeys(images),
    )
    ledger.update(env, lambda s: with_intent(s, intent))
    if outcome == "promoted":
        verdict = SecurityVerdict(scans=dict.fromkeys(images, "clean"))
        ledger.update(
            env,
            lambda s: promoted_state(
                s, plan, {}, approved_by="bob", verdict=verdict, flow_run_id=run
            ),
        )
    elif outcome == "rolled back":
        # flows/promotion.py: end_deploys(..., f"release {id} rolled back: {failure}")
        text = f"release {plan.release_id} rolled back: auth: health check failed"
        ledger.update(env, lambda s: without_intent(s, run, text))
    else:
        # tasks/deploy: the next run undoes a dead run's deploys
        text = (
            f"run {run} died deploying release {plan.release_id}; "
            "run r-next put the previous releases back"
        )
        ledger.update(env, lambda s: without_intent(s, run, text))
    return plan.release_id


def test_the_parsed_change_texts_are_the_ones_the_pipeline_writes() -> None:
    waves = (REPO / "tasks" / "deploy" / "waves.py").read_text(encoding="utf-8")
    deploy = (REPO / "tasks" / "deploy" / "__init__.py").read_text(encoding="utf-8")
    releases = (REPO / "tasks" / "releases.py").read_text(encoding="utf-8")
    assert 'f"release {plan.release_id} rolled back: {failure}"' in waves
    assert 'f"run {pending.flow_run_id} died deploying release {pending.release_id}; "' in deploy
    assert 'f"release {plan.release_id} promoted from {plan.source_environment}"' in releases


def test_promotions_rollbacks_and_a_rollback_by_hand(
    ledger: Ledger, commits: tuple[Path, list[str], datetime]
) -> None:
    repo, shas, committed = commits
    env = "production"
    first = {"auth": image("auth", 1, shas[0]), "course": image("course", 2, shas[0])}
    good = promote(ledger, env, "r1", first, outcome="promoted")
    bad = promote(ledger, env, "r2", {"auth": image("auth", 3, shas[1])}, outcome="rolled back")
    dead = promote(ledger, env, "r3", {"course": image("course", 4, shas[1])}, outcome="died")
    later = promote(ledger, env, "r4", {"auth": image("auth", 5, shas[2])}, outcome="promoted")
    ledger.restore_previous(env, "auth")  # cicd rollback production

    history = ledger.history(env)
    events = delivery_events(history)
    assert [(e.kind, e.release_id, e.source) for e in events] == [
        ("deployment", good, "promotion"),
        ("failed-promotion", bad, "pipeline"),
        ("failed-promotion", dead, "recovery"),
        ("deployment", later, "promotion"),
        ("rollback", later, "by-hand"),
    ]
    assert sorted(r.service for r in events[0].records) == ["auth", "course"]
    assert events[1].started_at is not None

    now = datetime.now(UTC) + timedelta(seconds=1)
    metrics = delivery_metrics(env, history, git_commit_times(repo), window_days=7, now=now)
    assert metrics.deployments == 2
    assert metrics.deployment_frequency_per_day == pytest.approx(2 / 7)
    assert (metrics.changes, metrics.failed_changes) == (4, 3)
    assert metrics.change_failure_rate == pytest.approx(0.75)
    # Lead time: the three records that went live, each from a commit COMMIT_AGE old.
    assert metrics.lead_time_samples == 3
    assert metrics.lead_time_median_s is not None
    assert metrics.lead_time_median_s == pytest.approx(
        (history[1].services["auth"].deployed_at - committed).total_seconds(), abs=120
    )
    assert COMMIT_AGE.total_seconds() - 60 < metrics.lead_time_median_s
    # Three restores: two failed promotions (intent -> rollback) and one by hand.
    assert metrics.restores == 3
    by_hand = (history[-1].updated_at - history[-2].updated_at).total_seconds()
    rolled = (history[3].updated_at - history[2].in_progress.started_at).total_seconds()  # type: ignore[union-attr]
    died = (history[5].updated_at - history[4].in_progress.started_at).total_seconds()  # type: ignore[union-attr]
    assert metrics.time_to_restore_median_s == pytest.approx(sorted([by_hand, rolled, died])[1])
    assert metrics.last_deployment_at == history[-2].updated_at


def test_ci_deploys_count_as_deployments_and_a_window_excludes_the_past(
    ledger: Ledger, commits: tuple[Path, list[str], datetime]
) -> None:
    repo, shas, _ = commits
    for n, (service, sha) in enumerate([("auth", shas[0]), ("course", shas[0]), ("auth", shas[1])]):
        ledger.record_deploy(
            "dev",
            ReleaseRecord(
                service=service,
                environment="dev",
                image=image(service, n + 1, sha),
                release_id=f"ci-0.{n}",
                commit=sha,
            ),
        )
    times = git_commit_times(repo)
    (now_metrics,) = environment_metrics(["dev"], window_days=1, ledger=ledger, commit_times=times)
    assert now_metrics.deployments == 3
    assert now_metrics.change_failure_rate == 0.0
    assert now_metrics.lead_time_samples == 3
    assert now_metrics.time_to_restore_median_s is None

    later = datetime.now(UTC) + timedelta(days=3)
    (old,) = environment_metrics(
        ["dev"], window_days=1, ledger=ledger, commit_times=times, now=later
    )
    assert (old.deployments, old.changes, old.change_failure_rate) == (0, 0, None)
    assert old.lead_time_median_s is None
    assert old.last_deployment_at is not None  # still known, outside the window

    (empty,) = environment_metrics(["staging"], ledger=ledger, commit_times=times)
    assert (empty.deployments, empty.last_deployment_at) == (0, None)
    with pytest.raises(ValueError, match="window_days"):
        delivery_metrics("dev", [], times, window_days=0)


def test_unknown_commits_give_no_lead_time(tmp_path: Path) -> None:
    times = git_commit_times(tmp_path)  # not a repository
    assert times("0" * 40) is None
    assert times("not-a-sha; rm -rf /") is None


def _sample(environment: str, **fields: float | None) -> DeliveryMetrics:
    now = datetime(2026, 1, 31, tzinfo=UTC)
    values: dict[str, object] = {
        "environment": environment,
        "since": now - timedelta(days=30),
        "until": now,
        "window_days": 30.0,
        "deployments": 6,
        "deployment_frequency_per_day": 0.2,
        "changes": 8,
        "failed_changes": 2,
        "change_failure_rate": 0.25,
        "lead_time_median_s": 7200.0,
        "lead_time_samples": 6,
        "time_to_restore_median_s": 300.0,
        "restores": 2,
        "last_deployment_at": now,
    }
    values.update(fields)
    return DeliveryMetrics.model_validate(values)


def test_prometheus_text_passes_promtool_and_parses(tmp_path: Path) -> None:
    stages = stage_metrics(
        [
            StageResult(service="auth", stage="pytest", status="passed", seconds=12.0),
            StageResult(service="auth", stage="pytest", status="passed", seconds=8.0),
            StageResult(service="auth", stage="pytest", status="cached"),
            StageResult(service="auth", stage="ruff", status="cached"),
            StageResult(service="course", stage="ruff", status="failed", seconds=1.5),
            StageResult(service="course", stage="mypy", status="skipped"),
        ]
    )
    assert [(s.service, s.stage, s.runs, s.mean_seconds, s.cached) for s in stages] == [
        ("auth", "pytest", 3, 10.0, 1),
        ("auth", "ruff", 1, None, 1),
        ("course", "ruff", 1, 1.5, 0),
    ]
    assert cache_hit_ratio(stages) == {"auth": 0.5, "course": 0.0}

    text = prometheus_text(
        [_sample("production"), _sample("dev", change_failure_rate=None, changes=0)], stages
    )
    checked = subprocess.run(
        [tool("promtool"), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr + text

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    prod = (("environment", "production"),)
    assert samples[("elice_delivery_change_failure_ratio", prod)] == 0.25
    assert samples[("elice_delivery_lead_time_seconds", prod)] == 7200.0
    assert samples[("elice_delivery_window_seconds", prod)] == 30 * 86400
    # Unknown is absent, never a made-up 0.
    assert ("elice_delivery_change_failure_ratio", (("environment", "dev"),)) not in samples
    assert (
        samples[("elice_ci_stage_duration_seconds", (("service", "auth"), ("stage", "pytest")))]
        == 10.0
    )
    assert (
        "elice_ci_stage_duration_seconds",
        (("service", "auth"), ("stage", "ruff")),
    ) not in samples
    assert samples[("elice_ci_cache_hit_ratio", (("service", "auth"),))] == 0.5
    assert {name for name, _ in samples} <= set(GAUGES)
    assert prometheus_text([]) == ""


def test_markdown_names_each_metric() -> None:
    text = metrics_markdown([_sample("production"), _sample("dev", change_failure_rate=None)])
    assert "| production | 6 | 0.20 | 2.0 h (6) | 25% (2/8) | 5.0 min |" in text
    assert "| dev | 6 | 0.20 | 2.0 h (6) | - | 5.0 min |" in text
    assert "30 days" in text


def test_publish_delivery_metrics_writes_the_artifact(tmp_path: Path) -> None:
    import uuid  # noqa: PLC0415

    from prefect import flow  # noqa: PLC0415
    from prefect.client.orchestration import get_client  # noqa: PLC0415
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey  # noqa: PLC0415

    from tasks.metrics import publish_delivery_metrics  # noqa: PLC0415

    env = f"m-{uuid.uuid4().hex[:10]}"
    current_ledger().record_deploy(
        env,
        ReleaseRecord(
            service="auth", environment=env, image=image("auth", 1, ""), release_id="ci-1.0"
        ),
    )

    @flow
    def after_promotion() -> DeliveryMetrics:
        store = ledger_filesystem(Settings.from_environ())
        return publish_delivery_metrics(store, env, Settings.from_environ().repo, window_days=7)

    metrics = after_promotion()
    assert (metrics.environment, metrics.deployments) == (env, 1)
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"delivery-{env}"]))
        )
    assert f"| {env} | 1 | 0.14 |" in str(artifact.data)

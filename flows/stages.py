"""The stage each task of a flow shows as: one table per flow, keyed by the task's name.

A task's name is its function's name; its run name, where it works on one service, is that
name, the service and (for deploys and rollbacks) the environment: `run_ruff-auth`,
`deploy_release-auth-staging`. Without a service in it, Prefect names the run
`<task name>-<3 hex>`. The display (cicd/progress.py) reads stages from these tables only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prefect import Task

from tasks.analysis import analyse_release
from tasks.backup import backup_environment
from tasks.deploy import (
    confirm_restored,
    deploy_release,
    deploy_service,
    recover_interrupted,
    restore_service,
    settle_record,
)
from tasks.health import check_service_health, smoke_test_release, verify_deployment
from tasks.images import build_image, publish_image
from tasks.locks import ensure_deploy_lock
from tasks.performance import check_regression, measure_baseline
from tasks.python_build import lock_service, sync_service
from tasks.quality import run_bandit, run_mypy, run_ruff
from tasks.registry import verify_release_image
from tasks.releases import (
    begin_rollback,
    check_reviewed,
    finish_rollback,
    plan_promotion,
    read_ledger,
    record_promotion,
    record_release,
)
from tasks.reports import publish_ci_artifacts
from tasks.security import generate_sbom, scan_dependencies, security_verdict
from tasks.source import detect_changes, fingerprint_service
from tasks.testing import run_pytest
from tasks.workspace import prepare_workspace, use_checkout


def _by_name(table: Mapping[Task[..., Any], str]) -> dict[str, str]:
    return {task.name: stage for task, stage in table.items()}


CI_STAGES = _by_name(
    {
        lock_service: "lock",
        sync_service: "sync",
        fingerprint_service: "fingerprint",
        run_ruff: "ruff",
        run_mypy: "mypy",
        run_bandit: "bandit",
        run_pytest: "pytest",
        build_image: "image",
        publish_image: "image",
        scan_dependencies: "scan",
        generate_sbom: "sbom",
        deploy_service: "deploy",
        verify_deployment: "health",
        record_release: "record",
        settle_record: "record",
    }
)
"""CI: task name -> the stage of one service it is."""

CI_STEPS = _by_name(
    {
        prepare_workspace: "workspace",
        use_checkout: "workspace",
        detect_changes: "changes",
        publish_ci_artifacts: "report",
    }
)
"""CI: task name -> the step of the run as a whole it is."""

PROMOTE_STAGES = _by_name(
    {
        verify_release_image: "image",
        smoke_test_release: "smoke",
        deploy_release: "deploy",
        check_service_health: "health",
        measure_baseline: "baseline",
        check_regression: "regression",
    }
)
"""promote: task name -> the stage of one service it is."""

PROMOTE_STEPS = _by_name(
    {
        ensure_deploy_lock: "lock",
        plan_promotion: "plan",
        check_reviewed: "reviewed",
        security_verdict: "security",
        backup_environment: "backup",
        analyse_release: "analysis",
        record_promotion: "record",
        confirm_restored: "rollback",
    }
)
"""promote: task name -> the step of the run as a whole it is."""

ROLLBACK_STAGES = _by_name({restore_service: "rollback"})
"""rollback: task name -> the stage of one service it is."""

ROLLBACK_STEPS = _by_name(
    {
        ensure_deploy_lock: "lock",
        recover_interrupted: "recover",
        read_ledger: "ledger",
        begin_rollback: "intent",
        finish_rollback: "record",
    }
)
"""rollback: task name -> the step of the run as a whole it is."""

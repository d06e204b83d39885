"""The security stage never reports "clean" without a real audit."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from blocks.catalog import ServiceSpec
from blocks.config import parse_config
from blocks.registry import OciRegistry
from core.errors import PromotionRefused, StageFailed
from core.records import ImageRef, PublishedImage
from tasks.registry import copy_image_by_digest
from tasks.releases import build_plan
from tasks.security import (
    check_request,
    generate_sbom,
    judge_scans,
    parse_pip_audit,
    scan_dependencies,
    syft_registry_env,
)
from tests.plugins.registries import AuthRegistry
from tests.tasks.plans import D1, D2, PLAN_CONFIG, ledger_state


def test_no_report_is_unknown_never_clean() -> None:
    report = parse_pip_audit("auth", 1, "ERROR: could not reach https://pypi.org\n")
    assert report.verdict == "unknown"
    assert "could not reach" in report.reason


def test_a_dependency_that_could_not_be_audited_makes_the_scan_unknown() -> None:
    output = json.dumps(
        {"dependencies": [{"name": "fastapi", "version": "0.1", "skip_reason": "not found"}]}
    )
    assert parse_pip_audit("auth", 0, output).verdict == "unknown"


def test_findings_make_the_scan_vulnerable_and_clean_needs_every_dependency_audited() -> None:
    vulnerable = {
        "dependencies": [
            {"name": "jinja2", "version": "2.0", "vulns": [{"id": "PYSEC-1"}]},
            {"name": "idna", "version": "3.7", "vulns": []},
        ]
    }
    report = parse_pip_audit("auth", 1, "some warning\n" + json.dumps(vulnerable))
    assert report.verdict == "vulnerable"
    assert report.findings == ["jinja2 2.0: PYSEC-1"]
    clean = {"dependencies": [{"name": "idna", "version": "3.7", "vulns": []}]}
    assert parse_pip_audit("auth", 0, json.dumps(clean)).verdict == "clean"


def test_real_pip_audit_on_a_service_lock_gives_a_verdict(config) -> None:
    repo = Path(__file__).resolve().parents[2]
    report = scan_dependencies.fn(config.service("course"), repo)
    # Without its vulnerability data (as on these machines) the verdict is unknown;
    # with it, clean or vulnerable. Never a silent pass without data.
    assert report.verdict in {"unknown", "clean"}
    if report.verdict == "unknown":
        assert report.reason


def test_a_missing_lock_file_is_unknown(tmp_path) -> None:
    spec = ServiceSpec(name="ghost", port=9999)
    report = scan_dependencies.fn(spec, tmp_path)
    assert report.verdict == "unknown"
    assert "requirements.lock" in report.reason


def test_vulnerable_lock_fails_the_stage(tmp_path, monkeypatch) -> None:
    spec = ServiceSpec(name="old", port=9998)
    lock = tmp_path / spec.path / "requirements.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("jinja2==2.0\n")
    fake_audit = tmp_path / "bin" / "pip-audit"
    fake_audit.parent.mkdir()
    payload = {"dependencies": [{"name": "jinja2", "version": "2.0", "vulns": [{"id": "X-1"}]}]}
    fake_audit.write_text(f"#!/bin/sh\necho '{json.dumps(payload)}'\nexit 1\n")
    fake_audit.chmod(0o755)
    monkeypatch.setattr("tasks.security.which", lambda tool: str(fake_audit))
    with pytest.raises(StageFailed, match="1 known vulnerabilities"):
        scan_dependencies.fn(spec, tmp_path)


# --- the promotion's scan gate (pure) ---------------------------------------------------


def test_scan_gate_needs_clean_scans_or_a_reasoned_override_where_gated() -> None:
    cfg = parse_config(PLAN_CONFIG, "test")
    prod = cfg.environment("q-prod")
    dev = ledger_state("q-dev", auth=(D1, True, "clean"), course=(D2, True, None))
    p = build_plan(cfg, "q-prod", None, "bob", dev, ledger_state("q-prod"))
    with pytest.raises(PromotionRefused, match=re.escape("no clean security scan for ['course']")):
        judge_scans(p, prod, False, None, gated=True)
    with pytest.raises(PromotionRefused, match="needs --override-reason"):
        judge_scans(p, prod, True, " ", gated=True)
    assert judge_scans(p, prod, False, None).overridden == []  # not gated: reported only
    verdict = judge_scans(p, prod, True, "scanner outage, CVE feed checked by hand", gated=True)
    assert verdict.overridden == ["course"]
    assert verdict.scans == {"auth": "clean", "course": "unknown"}
    bad = build_plan(
        cfg,
        "q-prod",
        None,
        "bob",
        ledger_state("q-dev", auth=(D1, True, "vulnerable")),
        ledger_state("q-prod"),
    )
    with pytest.raises(PromotionRefused, match="known vulnerabilities"):
        judge_scans(bad, prod, True, "ship it anyway")
    with pytest.raises(PromotionRefused, match="only meaningful with"):
        check_request(False, "a reason without an override")


@pytest.mark.stack
def test_syft_reads_an_authenticated_registry_with_its_login_only(
    pushed_image: ImageRef, oci_registry: OciRegistry, basic_registry: AuthRegistry, tmp_path
) -> None:
    copied = copy_image_by_digest(
        pushed_image,
        basic_registry.block.repository("course"),
        ["sbom"],
        source=oci_registry,
        target=basic_registry.block,
    )
    published = PublishedImage(image=copied, reused=False)
    sbom = generate_sbom.fn(published, tmp_path / "with-login", registry=basic_registry.block)
    assert sbom is not None
    assert json.loads(sbom.read_text())["packages"]
    # anonymous, syft is refused: no SBOM, and the stage says so instead of failing
    anonymous = basic_registry.anonymous()
    refused = generate_sbom.fn(published, tmp_path / "anonymous", registry=anonymous)
    assert refused is None
    env = syft_registry_env(basic_registry.block)
    assert env["SYFT_REGISTRY_INSECURE_USE_HTTP"] == "true"  # the loopback test registry
    https = basic_registry.block.model_copy(update={"insecure": False})
    assert syft_registry_env(https)["SYFT_REGISTRY_INSECURE_USE_HTTP"] == "false"

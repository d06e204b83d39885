"""The security stage never reports "clean" without a real audit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blocks.catalog import ServiceSpec
from tasks.exceptions import StageFailed
from tasks.security import parse_pip_audit, scan_dependencies


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

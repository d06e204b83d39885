"""Security: the dependency vulnerability scan, the image's SBOM, and the promotion's scan gate.

A scanner that cannot reach its vulnerability data gives "unknown", never "clean":
pip-audit without its data source prints "No known vulnerabilities found" and exits
0, so it runs with `--strict` and anything but a parsed JSON report is unknown.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from pydantic import BaseModel, Field

from blocks.catalog import ServiceSpec
from blocks.environments import EnvironmentSpec
from blocks.registry import OciRegistry
from core.errors import PromotionRefused, StageFailed, ToolError
from core.records import PromotionPlan, PublishedImage, SecurityVerdict
from tasks.process import run_logger, run_tool, which

Verdict = Literal["clean", "vulnerable", "unknown"]


class ScanReport(BaseModel):
    """The outcome of a dependency scan."""

    service: str
    verdict: Verdict
    findings: list[str] = Field(default_factory=list)
    reason: str = ""

    def summary_line(self) -> str:
        """One line for the CI report."""
        return f"{self.verdict}: {self.reason}" if self.reason else self.verdict

    def report_details(self) -> dict[str, str]:
        """Columns for the CI report."""
        return {"scan": self.verdict}


def parse_pip_audit(service: str, returncode: int, output: str) -> ScanReport:
    """Interpret pip-audit's JSON output; anything unparsable is unknown."""
    start = output.find("{")
    try:
        report = json.loads(output[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        report = None
    if not isinstance(report, dict) or not isinstance(report.get("dependencies"), list):
        tail = output.strip().splitlines()[-1:] or ["no output"]
        return ScanReport(
            service=service,
            verdict="unknown",
            reason=f"pip-audit gave no report (exit {returncode}): {tail[0][:300]}",
        )
    findings = [
        f"{dep.get('name')} {dep.get('version')}: {vuln.get('id')}"
        for dep in report["dependencies"]
        for vuln in dep.get("vulns") or []
    ]
    skipped = [str(dep.get("name")) for dep in report["dependencies"] if dep.get("skip_reason")]
    if findings:
        return ScanReport(service=service, verdict="vulnerable", findings=findings)
    if skipped:
        return ScanReport(
            service=service, verdict="unknown", reason=f"not audited: {', '.join(skipped)}"
        )
    return ScanReport(service=service, verdict="clean")


def _scan_cache_key(_context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """Same service, same locked requirements, same day: the same scan (data ages daily)."""
    service: ServiceSpec = parameters["service"]
    lock = Path(parameters["repo"]) / service.path / "requirements.lock"
    if not lock.is_file():
        return None
    return f"scan-{service.name}-{hashlib.sha256(lock.read_bytes()).hexdigest()}"


def _sbom_cache_key(_context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """An image's SBOM depends on its digest only."""
    published: PublishedImage = parameters["published"]
    return f"sbom-{published.image.digest}"


def pip_audit_command(lock: Path) -> list[str]:
    """pip-audit of the locked requirements `lock`, as JSON, pinned versions only."""
    return [
        which("pip-audit"),
        "--strict",
        "--no-deps",
        "--disable-pip",
        "--format",
        "json",
        "--progress-spinner",
        "off",
        "-r",
        str(lock),
    ]


@task(
    task_run_name="scan_dependencies-{service.name}",
    cache_key_fn=_scan_cache_key,
    cache_expiration=timedelta(hours=24),
)
def scan_dependencies(service: ServiceSpec, repo: Path, timeout_s: float = 120) -> ScanReport:
    """Audit the service's locked runtime requirements with pip-audit."""
    lock = repo / service.path / "requirements.lock"
    if not lock.is_file():
        return ScanReport(service=service.name, verdict="unknown", reason=f"{lock} is missing")
    try:
        done = run_tool(
            pip_audit_command(lock),
            cwd=repo,
            timeout=timeout_s,
        )
    except ToolError as exc:
        return ScanReport(service=service.name, verdict="unknown", reason=str(exc))
    report = parse_pip_audit(service.name, done.returncode, done.output)
    run_logger().info("%s: dependency scan %s %s", service.name, report.verdict, report.reason)
    lines = [f"- `{finding}`" for finding in report.findings] or [f"- {report.reason or 'none'}"]
    create_markdown_artifact(
        key=f"scan-{service.name}",
        markdown=f"## {service.name}: dependency scan **{report.verdict}**\n\n" + "\n".join(lines),
        description=f"pip-audit of {service.name}'s requirements.lock",
    )
    if report.verdict == "vulnerable":
        raise StageFailed(
            service.name, "scan", f"{len(report.findings)} known vulnerabilities", "\n".join(lines)
        )
    return report


def syft_registry_env(registry: OciRegistry | None) -> dict[str, str]:
    """syft's registry settings: HTTPS unless the registry block says plain HTTP (no block:
    the local stack's loopback registry), and the block's login when it has one."""
    env = {
        "SYFT_CHECK_FOR_APP_UPDATE": "false",
        "SYFT_REGISTRY_INSECURE_USE_HTTP": "true"
        if registry is None or registry.insecure
        else "false",
    }
    if registry is not None and registry.username is not None and registry.password is not None:
        env |= {
            "SYFT_REGISTRY_AUTH_AUTHORITY": registry.address,
            "SYFT_REGISTRY_AUTH_USERNAME": registry.username.get_secret_value(),
            "SYFT_REGISTRY_AUTH_PASSWORD": registry.password.get_secret_value(),
        }
    return env


@task(task_run_name="generate_sbom-{published.image.service}", cache_key_fn=_sbom_cache_key)
def generate_sbom(
    published: PublishedImage,
    out_dir: Path,
    timeout_s: float = 300,
    registry: OciRegistry | None = None,
) -> Path | None:
    """An SPDX JSON SBOM of the pushed image, made by syft from the registry; None if syft
    fails. `registry`: the image's registry block (HTTPS or not, and its login)."""
    image = published.image
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{image.service}-{image.short}.spdx.json"
    sbom_arg = f"spdx-json={target}"
    try:
        done = run_tool(
            [which("syft"), "scan", f"registry:{image.reference}", "-q", "-o", sbom_arg],
            env=syft_registry_env(registry),
            timeout=timeout_s,
        )
    except ToolError as exc:
        run_logger().warning("%s: no SBOM: %s", image.service, exc)
        return None
    if not done.ok or not target.is_file():
        run_logger().warning("%s: no SBOM: %s", image.service, done.excerpt(5))
        return None
    packages = json.loads(target.read_text(encoding="utf-8")).get("packages", [])
    create_markdown_artifact(
        key=f"sbom-{image.service}",
        markdown=(
            f"## SBOM of {image.service}\n\n`{image.reference}`\n\n"
            f"{len(packages)} packages (SPDX JSON at `{target}`)"
        ),
        description=f"syft SBOM of {image.service}",
    )
    return target


# --- the promotion's scan gate ------------------------------------------------------


def check_request(allow_unknown_scan: bool, override_reason: str | None) -> None:
    """Refuse inconsistent promotion options before anything happens.

    Raises:
        PromotionRefused: an override without a reason, or a reason without an override.
    """
    reason = (override_reason or "").strip()
    if allow_unknown_scan and not reason:
        msg = "--allow-unknown-scan needs --override-reason: say why an unscanned release may ship"
        raise PromotionRefused(msg)
    if reason and not allow_unknown_scan:
        msg = "--override-reason is only meaningful with --allow-unknown-scan"
        raise PromotionRefused(msg)


def judge_scans(
    plan: PromotionPlan,
    env: EnvironmentSpec,
    allow_unknown: bool,
    override_reason: str | None,
    gated: bool = False,
) -> SecurityVerdict:
    """The scan gate: production (and a `gated` environment) needs "clean" scans, or an
    override for unknown ones.

    A vulnerable release is never let through; elsewhere scans are reported only.

    Raises:
        PromotionRefused: a vulnerable release, or (production) an unknown scan without
            an override and a reason.
    """
    check_request(allow_unknown, override_reason)
    scans = {c.service: c.scan or "unknown" for c in plan.changes}
    vulnerable = sorted(s for s, v in scans.items() if v == "vulnerable")
    if vulnerable:
        msg = f"refusing to promote into {env.name}: known vulnerabilities in {vulnerable}"
        raise PromotionRefused(msg)
    unknown = sorted(s for s, v in scans.items() if v != "clean")
    if not unknown or not (env.paged or gated):
        return SecurityVerdict(scans=scans)
    if not allow_unknown:
        msg = (
            f"refusing to promote into {env.name}: no clean security scan for {unknown}; "
            "rescan, or pass --allow-unknown-scan --override-reason '...'"
        )
        raise PromotionRefused(msg)
    return SecurityVerdict(scans=scans, overridden=unknown, override_reason=override_reason)


@task(cache_policy=NO_CACHE)
def security_verdict(
    plan: PromotionPlan,
    env: EnvironmentSpec,
    allow_unknown: bool,
    override_reason: str | None,
    gated: bool = False,
) -> SecurityVerdict:
    """Apply the scan gate (see `judge_scans`) and log an override loudly."""
    verdict = judge_scans(plan, env, allow_unknown, override_reason, gated)
    if verdict.overridden:
        run_logger().warning(
            "security override into %s by %s for %s: %s",
            env.name,
            plan.promoted_by,
            verdict.overridden,
            verdict.override_reason,
        )
    return verdict

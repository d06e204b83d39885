"""The approval gate's judgement of answers (real SSH keys), the promoter's identity, the
plan shown to approvers, and the approval policy's rules."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import typer
from typer.testing import CliRunner

from blocks.approvals import ApprovalPolicy, EnvironmentPolicy, parse_policy
from blocks.config import parse_config
from cicd.promote_cli import register
from core.errors import AnswerRefused, ConfigError, PromotionRefused
from core.records import ImageRef, PlannedChange, PromotionPlan, make_plan, release_id
from tasks.approval import (
    ApprovalAnswer,
    identify_promoter,
    judge_answer,
    plan_markdown,
    sign_request,
    statement_for,
)
from tasks.signing import sign_statement

APPROVERS = ("platform-lead", "sre-oncall", "release-manager")
D1, D2, D3 = ("sha256:" + c * 64 for c in "123")


def image(service: str, digest: str, commit: str) -> ImageRef:
    return ImageRef(
        service=service, repository=f"127.0.0.1:5000/elice/{service}", digest=digest, commit=commit
    )


def plan(promoted_by: str = "sre-oncall") -> PromotionPlan:
    return make_plan(
        "production",
        "staging",
        [
            PlannedChange(
                service="auth",
                current_digest=D1,
                current_commit="a" * 40,
                image=image("auth", D2, "b" * 40),
                scan="clean",
            ),
            PlannedChange(
                service="course", current_digest=None, image=image("course", D3, "c" * 40)
            ),
        ],
        promoted_by,
    )


def flat(output: str) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(output.split())


# --- pure --------------------------------------------------------------------------------


def test_release_id_is_order_independent_and_digest_bound() -> None:
    assert release_id({"a": D1, "b": D2}) == release_id({"b": D2, "a": D1})
    assert release_id({"a": D1, "b": D2}) != release_id({"a": D1, "b": D3})
    assert len(release_id({"a": D1})) == 12
    with pytest.raises(ValueError, match="at least one service"):
        release_id({})


def test_plan_markdown_shows_digests_commits_and_changes() -> None:
    p = plan()
    text = plan_markdown(p)
    assert f"`{p.release_id}`" in text
    assert f"| auth | `{D1}` | `{D2}` | `{'a' * 12}..{'b' * 12}` | update |" in text
    assert f"| course | (not deployed) | `{D3}` | `{'c' * 12}` | new service |" in text
    assert "**staging**" in text
    assert "**sre-oncall**" in text


class People:
    """One real ed25519 key per name, and the allowed-signers text naming them."""

    def __init__(self, root: Path, names: list[str]) -> None:
        self.keys: dict[str, Path] = {}
        lines = []
        for name in names:
            key = root / name
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)],
                check=True,
            )
            self.keys[name] = key
            kind, blob = key.with_suffix(".pub").read_text().split()[:2]
            lines.append(f"{name} {kind} {blob}")
        self.allowed_signers = "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> People:
    return People(tmp_path_factory.mktemp("keys"), [*APPROVERS, "mallory", "gha"])


def policy_of(people: People, approvals: int = 1) -> ApprovalPolicy:
    return ApprovalPolicy(
        environments={
            "production": EnvironmentPolicy(approvers=APPROVERS, approvals_required=approvals)
        },
        allowed_signers=people.allowed_signers,
        automation_signers=("gha",),
        github_users={"octo-lead": "platform-lead"},
    )


def signed(people: People, p: PromotionPlan, run_id: str, who: str, **kw: Any) -> ApprovalAnswer:
    statement = statement_for(
        p, run_id, kw.pop("extra", {}), kw.pop("decision", "approve"), kw.pop("reason", ""), who
    )
    return ApprovalAnswer(
        statement=statement.model_dump_json(), signature=sign_statement(statement, people.keys[who])
    )


def judge(people: People, p: PromotionPlan, run_id: str, answer: Any, **kw: Any) -> Any:
    policy = kw.pop("policy", None) or policy_of(people)
    return judge_answer(
        answer,
        plan=p,
        run_id=run_id,
        extra_env=kw.pop("extra", {}),
        gate=policy.environments["production"],
        policy=policy,
        promoter=p.promoted_by,
        approved=kw.pop("approved", []),
    )


def test_a_signed_approval_by_an_approver_is_accepted(people: People) -> None:
    p, run_id = plan(), str(uuid4())
    verdict = judge(people, p, run_id, signed(people, p, run_id, "platform-lead"))
    assert (verdict.decision, verdict.principal) == ("approve", "platform-lead")
    assert verdict.proof.startswith("ssh-key SHA256:")
    rejected = judge(
        people,
        p,
        run_id,
        signed(people, p, run_id, "release-manager", decision="reject", reason="freeze"),
    )
    assert (rejected.decision, rejected.reason) == ("reject", "freeze")


def test_answers_without_proof_are_refused(people: People) -> None:
    p, run_id = plan(), str(uuid4())
    good = signed(people, p, run_id, "platform-lead")
    other_digests = json.loads(good.statement)
    other_digests["digests"]["auth"] = D3
    cases = {
        "not an armored SSH signature": (
            {"statement": good.statement, "signature": "x"},
            "platform-lead",
        ),
        "not an approver": (signed(people, p, run_id, "mallory"), "mallory"),
        "nobody approves their own": (signed(people, p, run_id, "sre-oncall"), "sre-oncall"),
        "digests differ": (
            {"statement": json.dumps(other_digests), "signature": good.signature},
            "platform-lead",
        ),
        "run_id differ": (signed(people, p, str(uuid4()), "platform-lead"), "platform-lead"),
        "extra_env differ": (
            signed(people, p, run_id, "platform-lead", extra={"auth": {"FAULT": "1"}}),
            "platform-lead",
        ),
        "not a valid approval statement": ({"statement": "{}", "signature": "x"}, "unknown"),
    }
    for expected, (answer, claimed) in cases.items():
        data = answer if isinstance(answer, dict) else answer.model_dump()
        with pytest.raises(AnswerRefused, match=expected) as info:
            judge(people, p, run_id, ApprovalAnswer.model_construct(**data))
        assert info.value.claimed == claimed, expected
    with pytest.raises(AnswerRefused, match="approved already"):
        judge(people, p, run_id, good, approved=["platform-lead"])


def test_a_key_proves_one_name_only(people: People) -> None:
    p, run_id = plan(), str(uuid4())
    statement = statement_for(p, run_id, {}, "approve", "", "release-manager")
    forged = ApprovalAnswer(
        statement=statement.model_dump_json(),
        signature=sign_statement(statement, people.keys["mallory"]),
    )
    with pytest.raises(AnswerRefused, match="belongs to mallory") as info:
        judge(people, p, run_id, forged)
    assert info.value.claimed == "release-manager"


def test_the_promoter_is_known_by_key_or_not_at_all(people: People) -> None:
    policy = policy_of(people)
    typed = identify_promoter("sre-oncall", None, None, policy, "production", None)
    assert (typed.name, typed.verified) == ("sre-oncall", False)
    request, signature = sign_request(
        "production", ["auth"], "sre-oncall", people.keys["sre-oncall"]
    )
    proven = identify_promoter("whoever", request, signature, policy, "production", ["auth"])
    assert (proven.name, proven.verified) == ("sre-oncall", True)
    with pytest.raises(PromotionRefused, match="another environment or other services"):
        identify_promoter("x", request, signature, policy, "production", ["course"])
    forged, _ = sign_request("production", None, "sre-oncall", people.keys["mallory"])
    _, mallory_sig = sign_request("production", None, "sre-oncall", people.keys["mallory"])
    with pytest.raises(PromotionRefused, match="proves nobody"):
        identify_promoter("x", forged, mallory_sig, policy, "production", None)
    bot, bot_sig = sign_request("production", None, "gha", people.keys["gha"], actor="octo-lead")
    acting = identify_promoter("gha", bot, bot_sig, policy, "production", None)
    assert acting.name == "platform-lead"  # the person the workflow ran for, not the bot
    assert "for octo-lead" in acting.proof


def test_the_policy_cannot_leave_production_ungated_or_come_from_the_caller() -> None:
    with pytest.raises(ConfigError, match="production always waits for an approval"):
        ApprovalPolicy().gate("production")
    assert ApprovalPolicy().gate("staging") is None
    with pytest.raises(ConfigError, match="approvals_required"):
        parse_policy("environments: {production: {approvers: [a], approvals_required: 2}}")
    with pytest.raises(ConfigError, match="greater than or equal to 1"):
        parse_policy("environments: {production: {approvers: [a], approvals_required: 0}}")
    committed = parse_policy((Path(__file__).parents[2] / "config/approvals.yaml").read_text())
    gate = committed.gate("production")
    assert gate is not None
    assert gate.approvals_required >= 1
    # a pipeline configuration that carries an approval policy is refused, naming why
    bad = {
        "services": [{"name": "auth", "port": 8002}],
        "environments": [
            {
                "name": "production",
                "namespace": "p",
                "replicas": {"min": 1, "max": 1},
                "log_level": "WARN",
                "storage": "s3",
                "approval_required": False,
                "local_port_offset": 1,
            }
        ],
    }
    with pytest.raises(ConfigError, match="approval policy is not part of the pipeline"):
        parse_config(bad, "caller.yaml")


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_cli_approve_unknown_run_exits_2(cli: typer.Typer, people: People) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "approve",
            "00000000-0000-0000-0000-000000000000",
            "--key",
            str(people.keys["platform-lead"]),
            "--as",
            "platform-lead",
        ],
    )
    assert result.exit_code == 2
    assert "no flow run" in flat(result.output)

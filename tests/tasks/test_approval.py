"""The approval gate: the plan, the form the server enforces, and the CLI that answers it."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any
from uuid import UUID

import pytest
import typer
from prefect import flow
from prefect._internal.pydantic.v2_schema import create_v2_schema
from prefect.client.orchestration import get_client
from prefect.flow_runs import pause_flow_run
from prefect.runtime import flow_run as current_run
from prefect.utilities.schema_tools import validate
from typer.testing import CliRunner

from cicd.promote_cli import register
from tasks.approval import (
    approval_input,
    approval_model,
    eligible_approvers,
    plan_markdown,
    read_decision,
    read_gate,
    release_id_from_schema,
    submit_answer,
    wait_for_final,
)
from tasks.exceptions import ApprovalRefused, GateError, PromotionRefused, PromotionRejected
from tasks.models import ImageRef, PlannedChange, PromotionPlan, make_plan, release_id

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


def schema_of(model: Any) -> dict[str, Any]:
    """The JSON schema Prefect stores for a paused run's form (what the server validates)."""
    return create_v2_schema(model.__name__, model_base=model)


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


def test_eligible_approvers_exclude_the_promoter() -> None:
    assert eligible_approvers(APPROVERS, "sre-oncall") == ["platform-lead", "release-manager"]
    with pytest.raises(PromotionRefused, match="nobody approves their own"):
        eligible_approvers(("alice",), "alice")


def test_form_requires_what_the_approver_must_type_and_enforces_it() -> None:
    p = plan()
    model = approval_model(p, APPROVERS)
    schema = schema_of(model)
    assert sorted(schema["required"]) == ["approver", "decision", "release_id"]
    assert schema["properties"]["approver"]["enum"] == ["platform-lead", "release-manager"]
    assert release_id_from_schema(schema) == p.release_id
    assert model._description == plan_markdown(p)
    ok = approval_input("platform-lead", p.release_id)
    assert validate(ok, schema, raise_on_error=True) == []
    refusals = {
        "approver": approval_input("mallory", p.release_id),
        "approver ": approval_input("sre-oncall", p.release_id),  # the promoter
        "release_id": approval_input("platform-lead", release_id({"auth": D1})),
        "reason": approval_input("platform-lead", p.release_id, "reject"),
    }
    for field, data in refusals.items():
        with pytest.raises(Exception, match=field.strip()):
            validate(data, schema, raise_on_error=True)
    blank = approval_input("platform-lead", p.release_id, "reject", "  ")
    with pytest.raises(Exception, match="reason"):
        validate(blank, schema, raise_on_error=True)
    rejected = approval_input("platform-lead", p.release_id, "reject", "not on a Friday")
    assert validate(rejected, schema, raise_on_error=True) == []


def test_read_decision_rejects_with_the_reason() -> None:
    p = plan()
    model = approval_model(p, APPROVERS)
    answer = model(**approval_input("release-manager", p.release_id, "reject", "change freeze"))
    with pytest.raises(
        PromotionRejected, match=r"release-manager rejected .*change freeze"
    ) as info:
        read_decision(p, APPROVERS, answer)
    assert info.value.plan == p
    approved = model(**approval_input("release-manager", p.release_id))
    assert read_decision(p, APPROVERS, approved) == "release-manager"


# --- against the real Prefect server ------------------------------------------------------

RUN_IDS: queue.Queue[UUID] = queue.Queue()


@flow(name="gate-probe")
def gate_probe(plan_json: str, approvers: list[str], timeout: int) -> str:
    p = PromotionPlan.model_validate_json(plan_json)
    RUN_IDS.put(UUID(str(current_run.id)))
    answer = pause_flow_run(
        wait_for_input=approval_model(p, approvers), timeout=timeout, poll_interval=1
    )
    return read_decision(p, tuple(approvers), answer)


def wait_for_gate(run_id: UUID, timeout: float = 30) -> Any:
    end = time.monotonic() + timeout
    while True:
        try:
            return read_gate(run_id)
        except GateError:
            if time.monotonic() > end:
                raise
            time.sleep(0.3)


class Paused:
    """A gate-probe run paused in a background thread; `final()` is its own final state."""

    def __init__(self, p: PromotionPlan) -> None:
        self.plan = p
        self._states: queue.Queue[Any] = queue.Queue()
        self._worker = threading.Thread(target=self._run, daemon=True)
        self._worker.start()
        self.run_id = RUN_IDS.get(timeout=60)
        wait_for_gate(self.run_id)

    def _run(self) -> None:
        self._states.put(
            gate_probe(
                plan_json=self.plan.model_dump_json(),
                approvers=list(APPROVERS),
                timeout=120,
                return_state=True,
            )
        )

    def final(self, timeout: float = 60) -> Any:
        return self._states.get(timeout=timeout)


@pytest.fixture
def paused() -> Iterator[Paused]:
    gate = Paused(plan())
    yield gate
    if gate._worker.is_alive() and run_state(gate.run_id).is_paused():
        submit_answer(gate.run_id, approval_input("platform-lead", gate.plan.release_id))
    gate._worker.join(timeout=60)


def run_state(run_id: UUID) -> Any:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).state


def test_server_refuses_bad_approvals_and_the_run_stays_paused(paused: Paused) -> None:
    run_id, p = paused.run_id, paused.plan
    gate = read_gate(run_id)
    assert gate.release_id == p.release_id
    assert f"`{D2}`" in gate.description
    refused = [
        approval_input("mallory", p.release_id),
        approval_input("sre-oncall", p.release_id),
        approval_input("platform-lead", release_id({"auth": D1, "course": D3})),
        approval_input("platform-lead", p.release_id, "reject"),
    ]
    reasons = []
    for data in refused:
        with pytest.raises(ApprovalRefused) as info:
            submit_answer(run_id, data)
        reasons.append(str(info.value))
        assert run_state(run_id).is_paused()
    assert "'mallory' is not one of" in reasons[0]
    assert "'sre-oncall' is not one of" in reasons[1]
    assert "does not match" in reasons[2]
    assert "'reason' is a required property" in reasons[3]
    submit_answer(run_id, approval_input("platform-lead", p.release_id))
    final = paused.final()
    assert final.is_completed()
    assert final.result() == "platform-lead"
    assert run_state(run_id).is_completed()


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_cli_approve_reads_the_answer(cli: typer.Typer, paused: Paused) -> None:
    run_id, p = paused.run_id, paused.plan
    runner = CliRunner()
    refused = runner.invoke(cli, ["approve", str(run_id), "--approver", "sre-oncall"])
    assert refused.exit_code == 1, refused.output
    assert "refused by the Prefect server" in flat(refused.output)
    assert "stays paused" in flat(refused.output)
    assert run_state(run_id).is_paused()
    stale = runner.invoke(
        cli, ["approve", str(run_id), "--approver", "platform-lead", "--release", "0" * 12]
    )
    assert stale.exit_code == 1, stale.output
    assert run_state(run_id).is_paused()
    done = runner.invoke(cli, ["approve", str(run_id), "--approver", "release-manager"])
    assert done.exit_code == 0, done.output
    assert f"approved release {p.release_id}" in flat(done.output)
    final = paused.final()
    assert final.is_completed()
    assert final.result() == "release-manager"
    again = runner.invoke(cli, ["approve", str(run_id), "--approver", "release-manager"])
    assert again.exit_code == 2
    assert "not waiting for an approval" in flat(again.output)


def test_cli_reject_fails_the_run_with_the_reason(cli: typer.Typer, paused: Paused) -> None:
    run_id = paused.run_id
    result = CliRunner().invoke(
        cli,
        ["reject", str(run_id), "--approver", "platform-lead", "--reason", "change freeze"],
    )
    assert result.exit_code == 0, result.output
    assert wait_for_final(run_id, timeout_s=60).is_failed()
    final = paused.final()
    assert isinstance(final.result(raise_on_failure=False), PromotionRejected)
    assert "platform-lead rejected" in final.message
    assert "change freeze" in final.message


def test_cli_approve_unknown_run_exits_2(cli: typer.Typer) -> None:
    result = CliRunner().invoke(
        cli, ["approve", "00000000-0000-0000-0000-000000000000", "--approver", "x"]
    )
    assert result.exit_code == 2
    assert "no flow run" in flat(result.output)

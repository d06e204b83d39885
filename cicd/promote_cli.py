"""`cicd promote | approve | reject | sign | audit | rollback`: the promotion path.

Exit codes: 0 done; 1 the pipeline said no (promotion refused, rejected, rolled back
or failed; an answer the gate refused); 2 nothing was attempted (bad arguments,
unknown environment or service, no such run, a run that is not waiting for approval).

`approve` and `reject` compute the plan of the paused run themselves (from the ledgers,
never from the description the server stores), show it, sign a statement of it with
the approver's SSH key and resume the run with it; then they wait for the gate's
verdict: an answer it refuses (a key not allowed, not an approver, the promoter
approving themselves) prints why and exits 1, and the run stays paused.
"""

from __future__ import annotations

import getpass
import json
import os
import time
from pathlib import Path
from typing import Annotated, Any
from uuid import UUID

import typer
from prefect.filesystems import WritableFileSystem
from rich.console import Console
from rich.table import Table

from blocks.storage import ledger_filesystem
from cicd import audit_cli
from cicd.common import (
    ConfigOption,
    TargetOption,
    cli_config,
    cli_settings,
    fail,
    prefect_api,
    split_names,
)
from cicd.history_cli import read_overrides
from core.errors import ApprovalError, ApprovalRefused, ConfigError, GateError, PipelineError
from core.records import short_digest
from tasks.approval import (
    Decision,
    answer_for,
    pause_expired,
    read_gate,
    sign_request,
    submit_answer,
)
from tasks.audit import ROLLOUT_KINDS, read_audit

console = Console()


# --- commands -------------------------------------------------------------------------


def _plan_table(plan: Any) -> Table:
    table = Table(
        title=f"release {plan.release_id}: {plan.source_environment} -> {plan.environment}"
    )
    for column in ("service", "now", "new", "commits"):
        table.add_column(column)
    for change in plan.changes:
        now = short_digest(change.current_digest) if change.current_digest else "-"
        table.add_row(change.service, now, change.image.short, change.commits)
    return table


def promote_command(
    to: Annotated[str, typer.Option("--to", help="Target environment, e.g. staging.")],
    services: Annotated[str | None, typer.Option(help="Comma-separated services.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan only; change nothing.")] = False,
    promoted_by: Annotated[
        str | None, typer.Option("--promoted-by", help="Who promotes (default: $USER).")
    ] = None,
    allow_unknown_scan: Annotated[
        bool, typer.Option("--allow-unknown-scan", help="Ship to production without a clean scan.")
    ] = False,
    override_reason: Annotated[
        str | None, typer.Option("--override-reason", help="Why (required with the override).")
    ] = None,
    config: ConfigOption = None,
    target: TargetOption = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Prefect's log stream, not the progress table.")
    ] = False,
    key: Annotated[
        Path | None,
        typer.Option(help="SSH key that signs the request (required where approval is)."),
    ] = None,
    freeze_override: Annotated[
        list[Path] | None,
        typer.Option(help="In a freeze: an approver's signed override (twice, two approvers)."),
    ] = None,
) -> None:
    """Promote the verified releases of the environment below into --to.

    Progress: a live services x stages table on a terminal, one line per finished stage
    otherwise; the run's UI link first, the approval command while it waits for one.
    """
    cfg = cli_config(config)
    try:
        env = cfg.environment(to)
    except ConfigError as exc:
        fail(str(exc), 2)
    if env.promotes_from is None:
        fail(f"{to} is not promoted into; CI deploys it", 2)
    chosen = split_names(services)
    if chosen:
        try:
            cfg.catalog.select(chosen)
        except ConfigError as exc:
            fail(str(exc), 2)
    if allow_unknown_scan != bool((override_reason or "").strip()):
        fail("--allow-unknown-scan and --override-reason go together", 2)
    overrides = read_overrides(freeze_override)
    who = promoted_by or os.environ.get("USER") or getpass.getuser()
    request: tuple[str, str] | None = None
    if key is not None:
        try:
            request = sign_request(to, chosen, who, key)
        except (ApprovalError, ValueError) as exc:
            fail(f"cannot sign the request as {who}: {exc}", 2)
    try:
        with prefect_api(start_stack=not dry_run):
            from cicd.progress import PROMOTE_VIEW, run_flow  # noqa: PLC0415
            from flows.promotion import promote  # noqa: PLC0415 - after the API is chosen

            state = run_flow(
                promote,
                {
                    "environment": to,
                    "services": chosen,
                    "promoted_by": who,
                    "dry_run": dry_run,
                    "allow_unknown_scan": allow_unknown_scan,
                    "override_reason": override_reason,
                    "config_source": config,
                    "target": target,
                    "request": request[0] if request else None,
                    "request_signature": request[1] if request else None,
                    "freeze_override": overrides,
                },
                view=PROMOTE_VIEW,
                console=console,
                services=cfg.catalog.names(),
                run_services=[s.name for s in cfg.catalog.select(chosen)] if chosen else None,
                verbose=verbose,
            )
    except GateError as exc:
        fail(str(exc), 2)
    outcome = state.result(raise_on_failure=False)
    plan = getattr(outcome, "plan", None)  # an outcome, or a promotion error with its plan
    if plan is not None:
        console.print(_plan_table(plan))
    if state.is_completed():
        if getattr(outcome, "dry_run", False):
            console.print("[cyan]dry run: nothing changed[/cyan]")
            return
        approver = getattr(outcome, "approved_by", None)
        suffix = f", approved by {approver}" if approver else ""
        console.print(f"[green]promoted into {to}{suffix}[/green]")
        return
    message = str(outcome) if isinstance(outcome, BaseException) else str(state.message)
    if pause_expired(message):  # the server fails a pause that expired
        message = f"nobody approved in time; nothing deployed ({message})"
    fail(message, 1)


KeyOption = Annotated[Path, typer.Option(help="Your SSH private key (or its .pub with an agent).")]
AsOption = Annotated[
    str | None, typer.Option("--as", help="Your name in the allowed signers (default: $USER).")
]
VERDICT_WAIT_S = 30.0


def _verdict(
    run_id: UUID, environment: str, since: float, store: WritableFileSystem
) -> tuple[str, str]:
    """What the gate made of the answer sent at `since`: (kind, detail) from the audit."""
    end = time.monotonic() + VERDICT_WAIT_S
    while time.monotonic() < end:
        for entry in reversed(read_audit(store, environment)):
            if entry.kind in ROLLOUT_KINDS:
                continue
            if entry.run_id == str(run_id) and entry.at.timestamp() >= since - 1:
                return entry.kind, entry.detail
        time.sleep(0.5)
    return "unknown", f"no verdict recorded within {VERDICT_WAIT_S:.0f}s; see the run"


def _answer(run_id: UUID, key: Path, signer: str | None, decision: Decision, reason: str) -> None:
    who = signer or os.environ.get("USER") or getpass.getuser()
    settings = cli_settings()
    try:
        with prefect_api():
            gate = read_gate(run_id)
            run_input, plan, statement = answer_for(
                run_id, key, who, decision, reason, settings=settings
            )
            console.print(_plan_table(plan))
            for service, variables in sorted(statement.extra_env.items()):
                console.print(f"  extra variables of {service}: {variables}")
            sent = time.time()
            submit_answer(run_id, run_input)
            kind, detail = _verdict(run_id, gate.environment, sent, ledger_filesystem(settings))
    except GateError as exc:
        fail(str(exc), 2)
    except ApprovalRefused as exc:
        fail(f"refused by the Prefect server, the run stays paused: {exc}", 1)
    except (ApprovalError, PipelineError) as exc:
        fail(str(exc), 1)
    if kind == "refused":
        fail(f"the gate refused the answer, the run stays paused: {detail}", 1)
    verb = {"approved": "approved", "rejected": "rejected"}.get(kind, kind)
    console.print(
        f"[green]{verb}[/green] release {plan.release_id} of run {gate.run_name} as {who}"
    )


def approve_command(
    run_id: Annotated[UUID, typer.Argument(help="The paused promotion's flow run id.")],
    key: KeyOption,
    signer: AsOption = None,
) -> None:
    """Approve a paused promotion, signed with your SSH key."""
    _answer(run_id, key, signer, "approve", "")


def reject_command(
    run_id: Annotated[UUID, typer.Argument(help="The paused promotion's flow run id.")],
    key: KeyOption,
    reason: Annotated[str, typer.Option(help="Why; recorded and sent to Slack.")],
    signer: AsOption = None,
) -> None:
    """Reject a paused promotion, signed; it ends Failed and nothing is deployed."""
    if not reason.strip():
        fail("--reason must say why", 2)
    _answer(run_id, key, signer, "reject", reason)


def sign_command(
    run_id: Annotated[UUID, typer.Argument(help="The paused promotion's flow run id.")],
    key: KeyOption,
    signer: AsOption = None,
    reject: Annotated[bool, typer.Option("--reject", help="Sign a rejection.")] = False,
    reason: Annotated[str, typer.Option(help="Why (required with --reject).")] = "",
) -> None:
    """Print a signed answer for the run's Resume form in the UI (statement, signature)."""
    if reject and not reason.strip():
        fail("--reject needs --reason", 2)
    who = signer or os.environ.get("USER") or getpass.getuser()
    try:
        with prefect_api():
            run_input, plan, _ = answer_for(
                run_id, key, who, "reject" if reject else "approve", reason, settings=cli_settings()
            )
    except GateError as exc:
        fail(str(exc), 2)
    except (ApprovalError, PipelineError) as exc:
        fail(str(exc), 1)
    console.print(_plan_table(plan))
    typer.echo("statement:")
    typer.echo(run_input["statement"])
    typer.echo("signature:")
    typer.echo(run_input["signature"])


def request_command(
    to: Annotated[str, typer.Option("--to", help="Target environment.")],
    key: KeyOption,
    signer: AsOption = None,
    services: Annotated[str | None, typer.Option(help="Comma-separated services.")] = None,
    actor: Annotated[
        str, typer.Option(help="For a workflow's key: the login the workflow runs for.")
    ] = "",
) -> None:
    """Print a signed promotion request as JSON (`request`, `request_signature`), for
    `prefect deployment run promote/promote --param ...` (GitHub Actions; production:
    `promote/promote-production`)."""
    who = signer or os.environ.get("USER") or getpass.getuser()
    try:
        request, signature = sign_request(to, split_names(services), who, key, actor=actor)
    except (ApprovalError, ValueError) as exc:
        fail(f"cannot sign the request as {who}: {exc}", 2)
    typer.echo(json.dumps({"request": request, "request_signature": signature}))


def rollback_command(
    environment: Annotated[str, typer.Argument(help="The environment to roll back.")],
    services: Annotated[str | None, typer.Option(help="Comma-separated services.")] = None,
    requested_by: Annotated[
        str | None, typer.Option("--requested-by", help="Who asks (default: $USER).")
    ] = None,
    config: ConfigOption = None,
    target: TargetOption = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Prefect's log stream, not the progress table.")
    ] = False,
    to_release: Annotated[
        str | None,
        typer.Option(
            "--to", help="A release of the ledger (`cicd history ENV`); default: the previous."
        ),
    ] = None,
) -> None:
    """Return an environment (or some services) to the previous releases in the ledger,
    or (--to) to any release of its ledger whose images are still in its registry."""
    cfg = cli_config(config)
    try:
        cfg.environment(environment)
    except ConfigError as exc:
        fail(str(exc), 2)
    chosen = split_names(services)
    if chosen:
        try:
            cfg.catalog.select(chosen)
        except ConfigError as exc:
            fail(str(exc), 2)
    try:
        with prefect_api(start_stack=True):
            from cicd.progress import ROLLBACK_VIEW, run_flow  # noqa: PLC0415
            from flows.promotion import rollback  # noqa: PLC0415

            state = run_flow(
                rollback,
                {
                    "environment": environment,
                    "services": chosen,
                    "requested_by": requested_by or os.environ.get("USER") or getpass.getuser(),
                    "config_source": config,
                    "target": target,
                    "to_release": to_release,
                },
                view=ROLLBACK_VIEW,
                console=console,
                services=cfg.catalog.names(),
                run_services=[s.name for s in cfg.catalog.select(chosen)] if chosen else None,
                verbose=verbose,
            )
    except GateError as exc:
        fail(str(exc), 2)
    restored = state.result(raise_on_failure=False)
    if not state.is_completed() or not isinstance(restored, dict):
        fail(str(restored) if isinstance(restored, BaseException) else str(state.message), 1)
    table = Table(title=f"{environment}: serving again")
    table.add_column("service")
    table.add_column("digest")
    for name, digest in sorted(restored.items()):
        table.add_row(name, short_digest(digest) if digest else "(removed)")
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add promote, approve, reject, sign, audit and rollback to the `cicd` app."""
    app.command("promote")(promote_command)
    app.command("approve")(approve_command)
    app.command("reject")(reject_command)
    app.command("sign")(sign_command)
    app.command("request")(request_command)
    audit_cli.register(app)
    app.command("rollback")(rollback_command)

"""`cicd promote | approve | reject | rollback`: the promotion path from a terminal.

Exit codes: 0 done; 1 the pipeline said no (promotion refused, rejected, rolled back
or failed; an approval the server refused); 2 nothing was attempted (bad arguments,
unknown environment or service, no such run, a run that is not waiting for approval).

`approve` and `reject` answer a paused promotion through the Prefect API and read the
server's answer: an approval the server refuses (an approver not on the list, the
promoter approving themselves, another release id, a rejection without a reason)
prints why and exits 1, and the run stays paused.
"""

from __future__ import annotations

import getpass
import os
from typing import Annotated, Any
from uuid import UUID

import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table

from cicd.common import ConfigOption, TargetOption, cli_config, fail, prefect_api, split_names
from tasks.approval import Decision, approval_input, pause_expired, read_gate, submit_answer
from tasks.exceptions import ApprovalRefused, ConfigError, GateError

console = Console()


# --- commands -------------------------------------------------------------------------


def _plan_table(plan: Any) -> Table:
    table = Table(
        title=f"release {plan.release_id}: {plan.source_environment} -> {plan.environment}"
    )
    for column in ("service", "now", "new", "commits"):
        table.add_column(column)
    for change in plan.changes:
        now = change.current_digest.removeprefix("sha256:")[:12] if change.current_digest else "-"
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
    target: TargetOption = "docker",
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Prefect's log stream, not the progress table.")
    ] = False,
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
    who = promoted_by or os.environ.get("USER") or getpass.getuser()
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


def _answer(
    run_id: UUID, approver: str, release: str | None, decision: Decision, reason: str
) -> None:
    try:
        with prefect_api():
            gate = read_gate(run_id)
            console.print(Markdown(gate.description or f"(run {gate.run_name})"))
            chosen = release or gate.release_id
            if not chosen:
                fail(f"run {run_id}: no release id in its form; pass --release", 2)
            submit_answer(run_id, approval_input(approver, chosen, decision, reason))
    except GateError as exc:
        fail(str(exc), 2)
    except ApprovalRefused as exc:
        fail(f"refused by the Prefect server, the run stays paused: {exc}", 1)
    verb = "approved" if decision == "approve" else "rejected"
    console.print(f"[green]{verb}[/green] release {chosen} of run {gate.run_name} as {approver}")


def approve_command(
    run_id: Annotated[UUID, typer.Argument(help="The paused promotion's flow run id.")],
    approver: Annotated[str, typer.Option(help="Who approves (an allowlisted approver).")],
    release: Annotated[
        str | None, typer.Option(help="Release id to approve (default: the one the run shows).")
    ] = None,
) -> None:
    """Approve a paused production promotion."""
    _answer(run_id, approver, release, "approve", "")


def reject_command(
    run_id: Annotated[UUID, typer.Argument(help="The paused promotion's flow run id.")],
    approver: Annotated[str, typer.Option(help="Who rejects (an allowlisted approver).")],
    reason: Annotated[str, typer.Option(help="Why; recorded and sent to Slack.")],
    release: Annotated[str | None, typer.Option(help="Release id (default: the run's).")] = None,
) -> None:
    """Reject a paused production promotion; it ends Failed and nothing is deployed."""
    if not reason.strip():
        fail("--reason must say why", 2)
    _answer(run_id, approver, release, "reject", reason)


def rollback_command(
    environment: Annotated[str, typer.Argument(help="The environment to roll back.")],
    services: Annotated[str | None, typer.Option(help="Comma-separated services.")] = None,
    requested_by: Annotated[
        str | None, typer.Option("--requested-by", help="Who asks (default: $USER).")
    ] = None,
    config: ConfigOption = None,
    target: TargetOption = "docker",
) -> None:
    """Return an environment (or some services) to the previous releases in the ledger."""
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
            from flows.promotion import rollback  # noqa: PLC0415

            state = rollback(
                environment=environment,
                services=chosen,
                requested_by=requested_by or os.environ.get("USER") or getpass.getuser(),
                config_source=config,
                target=target,
                return_state=True,
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
        table.add_row(name, digest.removeprefix("sha256:")[:12] if digest else "(removed)")
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add promote, approve, reject and rollback to the `cicd` app."""
    app.command("promote")(promote_command)
    app.command("approve")(approve_command)
    app.command("reject")(reject_command)
    app.command("rollback")(rollback_command)

"""`cicd history | override-freeze`: an environment's releases, and a signed freeze override.

`history ENV` lists every release of the environment's ledger, newest first: which serves
now, and which `cicd rollback ENV --to RELEASE` can return to (and why not), judged as the
rollback judges them: the commit on the protected branch after a fresh fetch, the image's
digest in the environment's registry.

`override-freeze ENV --release ID --reason ... --key KEY` prints one approver's signed
override of the environment's freeze for one release, as JSON; two approvers' files go to
`cicd promote --freeze-override FILE --freeze-override FILE`.

Exit codes: 0 done; 2 bad arguments or nothing could be read.
"""

from __future__ import annotations

import getpass
import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from blocks.repository import pinned_repository
from blocks.storage import ledger_filesystem
from cicd.common import ConfigOption, cli_config, cli_settings, fail, read_api
from core.errors import ConfigError, PipelineError, SigningError
from core.records import short_digest
from core.windows import parse_clock
from tasks.freeze import sign_override
from tasks.history import ReleaseStatus, history_of
from tasks.images import environment_registry

console = Console()


def _row(status: ReleaseStatus) -> list[str]:
    release = status.release
    services = ", ".join(
        f"{name} {short_digest(r.image.digest)}" for name, r in release.records.items()
    )
    if len(status.serving) == len(release.records):
        serving = "serving"
    else:
        serving = ", ".join(status.serving) if status.serving else "-"
    if status.returnable:
        verdict = "yes"
    elif status.problems:
        verdict = "no: " + "; ".join(status.problems)
    else:
        verdict = "no: it serves now"
    when = f"{release.deployed_at:%Y-%m-%d %H:%M}"
    return [release.release_id, when, services, serving, verdict]


def history_command(
    environment: Annotated[str, typer.Argument(help="The environment whose releases to list.")],
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per release.")] = False,
) -> None:
    """Every release in the environment's ledger, newest first: which serves, which
    `cicd rollback ENV --to RELEASE` can return to, and why not."""
    settings = cli_settings()
    cfg = cli_config(config, settings)
    try:
        env = cfg.environments.resolve(environment)
    except ConfigError as exc:
        fail(str(exc))
    try:
        with read_api():
            statuses = history_of(
                (ledger_filesystem(settings), cfg.catalog.names()),
                env.name,
                pinned_repository(settings),
                environment_registry(env, settings.trust_roots()),
            )
    except (PipelineError, ValueError) as exc:
        fail(str(exc), 2)
    if as_json:
        for status in statuses:
            data = status.model_dump(mode="json")
            data["returnable"] = status.returnable
            typer.echo(json.dumps(data))
        return
    table = Table(title=f"releases of {env.name}, newest first")
    for column in ("release", "first served", "services", "serving", "can return to"):
        table.add_column(column, overflow="fold")
    for status in statuses:
        table.add_row(*_row(status))
    console.print(table)


def override_freeze_command(
    environment: Annotated[str, typer.Argument(help="The frozen environment.")],
    release: Annotated[str, typer.Option(help="The release id `cicd promote --dry-run` shows.")],
    reason: Annotated[str, typer.Option(help="Why it must ship in the freeze (recorded).")],
    key: Annotated[Path, typer.Option(help="Your SSH private key (or its .pub with an agent).")],
    signer: Annotated[
        str | None, typer.Option("--as", help="Your name in the allowed signers (default: $USER).")
    ] = None,
) -> None:
    """Print your signed override of the environment's freeze for one release (JSON)."""
    if not reason.strip():
        fail("--reason must say why the release ships in the freeze", 2)
    who = signer or os.environ.get("USER") or getpass.getuser()
    clock = cli_settings().clock  # a drill's clock signs at the drill's time
    try:
        at = parse_clock(clock) if clock else None
        signed = sign_override(environment, release, reason, who, key, at)
    except (SigningError, ValueError) as exc:
        fail(f"cannot sign the override as {who}: {exc}", 2)
    typer.echo(json.dumps(signed))


def read_overrides(paths: list[Path] | None) -> list[dict[str, str]] | None:
    """The signed overrides in `paths` (each as `override-freeze` printed it); None: none.

    Exits with code 2 naming a file that cannot be read or is not an override's JSON.
    """
    if not paths:
        return None
    found = []
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            fail(f"--freeze-override {path}: cannot read a signed override: {exc}", 2)
        if not isinstance(data, dict) or not {"statement", "signature"} <= data.keys():
            fail(f"--freeze-override {path}: not what `cicd override-freeze` prints", 2)
        found.append({"statement": str(data["statement"]), "signature": str(data["signature"])})
    return found


def register(app: typer.Typer) -> None:
    """Add history and override-freeze to the `cicd` app."""
    app.command("history")(history_command)
    app.command("override-freeze")(override_freeze_command)

"""`cicd github setup [--dry-run]`: the GitHub repository set up for the pipeline.

Branch protection, the environments staging and production, and the Actions secrets the
workflow reads (tasks/github/repository.py), on the repository the saved `elice-github`
block names. Prints the plan, then each call as it is made; a second run prints
"nothing to change". Exit codes: 0 done or planned; 1 GitHub refused or failed part-way
(what was done stays done; run it again); 2 nothing was attempted (bad input, no block,
GitHub unreadable).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from prefect.blocks.system import Secret
from prefect.settings import PREFECT_API_AUTH_STRING
from pydantic import SecretStr

from blocks.github import GITHUB_BLOCK, GitHubRepository, load_github
from cicd.common import cli_settings, fail, prefect_api
from core.errors import PipelineError

if TYPE_CHECKING:
    from githubkit import GitHub

    from tasks.github.repository import SecretRecord, SetupStep

app = typer.Typer(
    name="github", no_args_is_help=True, help="GitHub: the repository set up for the pipeline."
)
_SIGN = {"create": "+", "update": "~"}


def _promote_key(path: Path | None) -> str | None:
    """The workflow's SSH signing key, checked before anything is sent."""
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        fail(f"--promote-key {path}: {exc.strerror or exc}")
    if "PRIVATE KEY-----" not in text.split("\n", 1)[0]:
        fail(f"--promote-key {path}: not a private key in OpenSSH (PEM) form")
    return text


def _repository(token_block: str | None) -> GitHubRepository:
    repo = load_github()
    if repo is None:
        fail(
            f"no GitHub repository configured: save a GitHubRepository block named "
            f"{GITHUB_BLOCK} (repository, api_url, token)"
        )
    if token_block is None:
        return repo
    try:
        secret = Secret.load(token_block)
    except ValueError:
        secret = None
    if not isinstance(secret, Secret):
        fail(f"--token-block {token_block}: no Secret block of that name is saved")
    token = str(secret.get()).strip()
    if not token:
        fail(f"--token-block {token_block}: the secret is empty")
    return repo.model_copy(update={"token": SecretStr(token)})


def _line(step: SetupStep) -> str:
    return f"{_SIGN[step.action]} {step.action} {step.kind} {step.name}: {step.detail}"


def _plan(
    token_block: str | None, prefect_api_url: str | None, promote_key: str | None
) -> tuple[GitHubRepository, GitHub[Any], dict[str, str], SecretRecord, list[SetupStep]]:
    """The repository, its client, the secrets to send, their record and the plan.

    Exits 2 when nothing can be planned: no Prefect API, no block, GitHub unreadable.
    """
    from tasks.github.client import github_client  # noqa: PLC0415 - githubkit when asked
    from tasks.github.repository import (  # noqa: PLC0415
        plan_setup,
        secret_record,
        wanted_secrets,
    )

    try:
        with prefect_api() as url:
            repo = _repository(token_block)
            auth = PREFECT_API_AUTH_STRING.value()
            auth_string = auth.get_secret_value() if isinstance(auth, SecretStr) else auth
            secrets = wanted_secrets(prefect_api_url or url, auth_string, promote_key)
        gh = github_client(repo)
        record = secret_record(cli_settings().resolved_state_dir(), repo)
        return repo, gh, secrets, record, plan_setup(gh, repo, secrets, record)
    except PipelineError as exc:
        fail(str(exc))


def setup_command(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; change nothing.")
    ] = False,
    prefect_api_url: Annotated[
        str | None,
        typer.Option(help="The Prefect API URL the workflow uses (default: the one used here)."),
    ] = None,
    promote_key: Annotated[
        Path | None,
        typer.Option(help="The workflow's SSH key for promotion requests (ELICE_PROMOTE_KEY)."),
    ] = None,
    token_block: Annotated[
        str | None,
        typer.Option(
            help="A Secret block with an administration token (default: the elice-github"
            " block's token)."
        ),
    ] = None,
) -> None:
    """Protect the branch, create the environments, send the secrets; idempotently."""
    from tasks.github.repository import apply_step  # noqa: PLC0415 - githubkit when asked

    if prefect_api_url is not None and not prefect_api_url.startswith(("http://", "https://")):
        fail(f"--prefect-api-url must be an http(s) URL, got {prefect_api_url!r}")
    key = _promote_key(promote_key)
    repo, gh, secrets, record, steps = _plan(token_block, prefect_api_url, key)
    typer.echo(f"GitHub {repo.repository} at {repo.api_url}:")
    for name in ("PREFECT_API_AUTH_STRING", "ELICE_PROMOTE_KEY"):
        if not any(held.endswith(name) for held in secrets):
            typer.echo(f"  (secret {name}: no value here, left as it is)")
    if not steps:
        typer.echo("nothing to change")
        return
    for step in steps:
        typer.echo(f"  {_line(step)}")
    if dry_run:
        typer.echo(f"dry run: {len(steps)} changes planned, nothing changed")
        return
    for step in steps:
        try:
            apply_step(gh, repo, step, secrets, record)
        except PipelineError as exc:
            fail(f"{_line(step)}: {exc}", code=1)
        typer.echo(f"done: {step.action} {step.kind} {step.name}")
    typer.echo(f"{len(steps)} changes made")


app.command("setup")(setup_command)

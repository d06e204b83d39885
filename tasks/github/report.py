"""The flows' call points into GitHub: one each, inert unless the `elice-github` block is saved.

    ci_status_hook(read_outcome)   a `ci` state hook: commit statuses, the pull request's
                                   summary, and a deployment into dev when the run shipped
    github_deployment(plan, ...)   around a promotion's deploy: in_progress, then success
                                   (the replaced one inactive) or failure
    report_rejection               a `promote` failure hook: a rejected release as a failed
                                   deployment naming who rejected it
    report_rollback                a `rollback` completion hook: the rolled-back deployment
                                   inactive, the restored release a new successful one

Reporting never decides a run: each call is retried by the client, and whatever still
fails (GitHub down, a refused token) is logged as a warning and the run goes on.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from prefect import Flow
from prefect.client.schemas.objects import FlowRun, State
from prefect.flows import FlowStateHook

from blocks.github import GitHubRepository, load_github
from core.errors import PromotionRejected, PromotionRolledBack, ToolError
from core.records import CiOutcome, PromotionPlan, short_digest
from tasks.masking import scrub_masked
from tasks.notify import flow_run_url
from tasks.process import run_logger

if TYPE_CHECKING:
    from githubkit import GitHub

    from tasks.github.statuses import StatusState

# githubkit takes over a second to import: the modules that use it are imported below, in
# the functions that run only where GitHub is configured, so a flow without it pays nothing.

_SHA = re.compile(r"^[0-9a-f]{40}$")


_GAVE_UP: ContextVar[bool] = ContextVar("github_gave_up", default=False)
"""Set once a report found GitHub unavailable (after the client's retries): the rest of
that report is skipped rather than waiting through the same retries again."""


def _quietly(what: str, action: Callable[[], Any]) -> Any:
    """`action()`, or None with a warning when GitHub could not be told."""
    if _GAVE_UP.get():
        run_logger().warning("GitHub: %s not reported: GitHub was unavailable", what)
        return None
    try:
        return action()
    # A report never decides a run: besides the client's errors (PipelineError) an
    # unexpected answer's shape or the Prefect API failing to load the block is logged too.
    except Exception as exc:  # noqa: BLE001
        run_logger().warning("GitHub: %s not reported: %s", what, scrub_masked(str(exc)))
        if isinstance(exc, ToolError):
            _GAVE_UP.set(True)
        return None


def _github() -> tuple[GitHubRepository, GitHub[Any]] | None:
    """The saved repository and a client for it; None when GitHub is not configured."""
    from tasks.github.client import github_client  # noqa: PLC0415 - see the imports

    _GAVE_UP.set(False)  # each report tries afresh
    repo = _quietly("configuration", load_github)
    return (repo, github_client(repo)) if isinstance(repo, GitHubRepository) else None


def _report_ci(
    repo: GitHubRepository, gh: GitHub[Any], outcome: CiOutcome, run_url: str | None, env: str
) -> None:
    from tasks.github.deployments import finish_deployment, start_deployment  # noqa: PLC0415
    from tasks.github.statuses import (  # noqa: PLC0415
        group_statuses,
        pull_number,
        set_commit_statuses,
        summary_comment,
        upsert_summary,
    )

    sha = outcome.commit
    statuses = group_statuses(outcome)
    _quietly(
        f"statuses of {sha[:12]}", lambda: set_commit_statuses(gh, repo, sha, statuses, run_url)
    )
    number = pull_number(outcome.ref)
    if number is not None:
        body = summary_comment(outcome, run_url)
        _quietly(f"summary on #{number}", lambda: upsert_summary(gh, repo, number, body))
    deploys = [r for r in outcome.results if r.stage == "deploy" and r.status != "skipped"]
    if outcome.shipped and deploys:
        failed = [r.service for r in deploys if r.status == "failed"]
        payload = {
            r.service: {"digest": str(r.details.get("digest", "")), "commit": sha} for r in deploys
        }
        text = f"CI deploy of {len(deploys)} services" + (
            f"; failed: {', '.join(failed)}" if failed else ""
        )

        def deploy() -> None:
            ident = start_deployment(
                gh,
                repo,
                environment=env,
                sha=sha,
                task="deploy",
                description=text,
                payload=payload,
                log_url=run_url,
            )
            finish_deployment(
                gh, repo, ident, env, ok=not failed, description=text, log_url=run_url
            )

        _quietly(f"deployment of {sha[:12]} to {env}", deploy)


def ci_status_hook(
    read_outcome: Callable[[State[Any]], CiOutcome | None],
) -> FlowStateHook[..., Any]:
    """A `ci` state hook (completion and failure) reporting the run to GitHub.

    `read_outcome` reads the run's CiOutcome from its final state. A run that ended before
    checking anything (bad input, an unreadable repository) marks the required contexts
    `error` when its `head` parameter is a SHA, so a pull request does not wait forever.
    """

    def report_ci_to_github(flow: Flow[..., Any], flow_run: FlowRun, state: State[Any]) -> None:  # noqa: ARG001
        github = _github()
        if github is None:
            return
        repo, gh = github
        run_url = flow_run_url(str(flow_run.id))
        params = flow_run.parameters or {}
        outcome = read_outcome(state)
        if outcome is not None:
            _report_ci(repo, gh, outcome, run_url, str(params.get("environment") or "dev"))
            return
        from tasks.github.statuses import REQUIRED_CONTEXTS, set_commit_statuses  # noqa: PLC0415

        head = str(params.get("head") or "")
        if _SHA.match(head):
            reason = f"the run ended before checking: {state.message or state.type.value}"
            errors: dict[str, tuple[StatusState, str]] = dict.fromkeys(
                REQUIRED_CONTEXTS, ("error", reason)
            )
            _quietly(
                f"statuses of {head[:12]}",
                lambda: set_commit_statuses(gh, repo, head, errors, run_url),
            )

    return report_ci_to_github


def plan_commit(plan: PromotionPlan) -> str | None:
    """The commit a promotion's GitHub deployment names: the one most of its services were
    built from (the first of those in the plan on a tie); None when none is recorded."""
    commits = Counter(c.commit for c in plan.changes if _SHA.match(c.commit))
    return commits.most_common(1)[0][0] if commits else None


def _described(plan: PromotionPlan, approved_by: str | None) -> str:
    text = (
        f"release {plan.release_id}: {len(plan.changes)} services from "
        f"{plan.source_environment}, promoted by {plan.promoted_by}"
    )
    return text + (f", approved by {approved_by}" if approved_by else "")


@contextmanager
def github_deployment(plan: PromotionPlan, approved_by: str | None) -> Iterator[None]:
    """Around a promotion's deploy: a GitHub deployment in progress, then its outcome.

    Success names who promoted and who approved (their principals) and marks the replaced
    deployment inactive; a failure says what failed and whether it was rolled back (the
    deployment that served before stays active). Never raises on GitHub's account.
    """
    github = _github()
    sha = plan_commit(plan)
    if github is None or sha is None:
        yield
        return
    from tasks.github.deployments import finish_deployment, start_deployment  # noqa: PLC0415

    repo, gh = github
    run_url, env = flow_run_url(), plan.environment
    payload = {
        "release": plan.release_id,
        "services": {
            c.service: {"digest": c.image.digest, "commit": c.commit} for c in plan.changes
        },
    }
    text = _described(plan, approved_by)
    ident = _quietly(
        f"deployment to {env}",
        lambda: start_deployment(
            gh,
            repo,
            environment=env,
            sha=sha,
            task="deploy:promote",
            description=text,
            payload=payload,
            log_url=run_url,
        ),
    )
    try:
        yield
    except BaseException as failure:
        if ident is not None:
            what = "rolled back" if isinstance(failure, PromotionRolledBack) else "failed"
            reason = f"{what}: {failure}" if str(failure) else what
            _quietly(
                f"deployment {ident}",
                lambda: finish_deployment(
                    gh, repo, ident, env, ok=False, description=reason, log_url=run_url
                ),
            )
        raise
    if ident is not None:
        _quietly(
            f"deployment {ident}",
            lambda: finish_deployment(
                gh, repo, ident, env, ok=True, description=text, log_url=run_url
            ),
        )


def _returned_to(
    gh: GitHub[Any], repo: GitHubRepository, older: list[dict[str, Any]], release: str | None
) -> dict[str, Any] | None:
    """The deployment a rollback returned to: the promotion of `release` when it names
    one, else the newest older deployment that once served."""
    from tasks.github.deployments import was_successful  # noqa: PLC0415

    if release is not None:
        return next((d for d in older if (d.get("payload") or {}).get("release") == release), None)
    return next((d for d in older if was_successful(gh, repo, int(d["id"]))), None)


def _rolled_back(
    gh: GitHub[Any],
    repo: GitHubRepository,
    env: str,
    who: str,
    returns: tuple[Any, str | None],
    run_url: str | None,
) -> None:
    """`returns`: (the rollback's service -> digest now serving, the release asked for)."""
    from tasks.github.deployments import (  # noqa: PLC0415
        finish_deployment,
        latest_active,
        set_state,
        start_deployment,
    )

    found = latest_active(gh, repo, env)
    if found is None:
        run_logger().info("GitHub: no active deployment of %s to mark rolled back", env)
        return
    current, older = found
    set_state(gh, repo, int(current["id"]), "inactive", f"rolled back by {who}", run_url, env)
    restored, release = returns
    previous = _returned_to(gh, repo, older, release)
    if previous is None:
        run_logger().info("GitHub: no deployment of %s to show %s returned to", env, release)
        return
    digests = {s: short_digest(d) if d else None for s, d in dict(restored or {}).items()}
    text = f"rolled back by {who} to deployment {previous['id']}"
    ident = start_deployment(
        gh,
        repo,
        environment=env,
        sha=str(previous["sha"]),
        task="deploy:rollback",
        description=text,
        payload={"rolled_back": current["id"], "restored": digests},
        log_url=run_url,
    )
    finish_deployment(gh, repo, ident, env, ok=True, description=text, log_url=run_url)


def report_rollback(flow: Flow[..., Any], flow_run: FlowRun, state: State[Any]) -> None:  # noqa: ARG001
    """A `rollback` completion hook: GitHub's active deployment of the environment marked
    inactive (rolled back, by whom), and the one returned to (the one before it, or the
    promotion of the `to_release` asked for) deployed again as a new one."""
    github = _github()
    if github is None:
        return
    repo, gh = github
    params = flow_run.parameters or {}
    env = str(params.get("environment") or "")
    who = str(params.get("requested_by") or "unknown")
    restored = state.result(raise_on_failure=False)
    run_url = flow_run_url(str(flow_run.id))
    _quietly(
        f"rollback of {env}",
        lambda: _rolled_back(
            gh,
            repo,
            env,
            who,
            (restored if isinstance(restored, dict) else {}, params.get("to_release")),
            run_url,
        ),
    )


def report_rejection(flow: Flow[..., Any], flow_run: FlowRun, state: State[Any]) -> None:  # noqa: ARG001
    """A `promote` failure hook: a release an approver rejected (or nobody approved in time)
    shows as a failed deployment whose description names the rejecting principal."""
    error = state.result(raise_on_failure=False)
    if not isinstance(error, PromotionRejected) or error.plan is None:
        return
    plan = error.plan
    sha = plan_commit(plan)
    github = _github() if sha is not None else None
    if github is None or sha is None:
        return
    from tasks.github.deployments import start_deployment  # noqa: PLC0415 - see the imports

    repo, gh = github
    run_url = flow_run_url(str(flow_run.id))
    _quietly(
        f"rejection of {plan.release_id}",
        lambda: start_deployment(
            gh,
            repo,
            environment=plan.environment,
            sha=sha,
            task="deploy:promote",
            description=str(error),
            payload={"release": plan.release_id},
            log_url=run_url,
            state="failure",
        ),
    )

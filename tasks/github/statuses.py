"""What a CI run shows on GitHub: a commit status per stage group, a pull request summary.

    group_statuses(outcome)         context -> (state, description) for the commit checked
    set_commit_statuses(gh, ...)    one commit status per context, the Prefect run as target
    upsert_summary(gh, ...)         the pull request's one summary comment, edited in place

Contexts are `elice/<group>`: checks (lock, sync, ruff, mypy, bandit), tests (pytest with
coverage), image (build, scan, SBOM) and delivery (deploy, health, record). Branch
protection requires `REQUIRED_CONTEXTS`, the two every run sets, whether it delivers or
not, and whatever it affected: a run with nothing to check passes them.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from githubkit import GitHub

from blocks.github import GitHubRepository
from core.records import CiOutcome, StageResult
from tasks.github.client import call, collect
from tasks.reports import markdown_report

CONTEXT_PREFIX = "elice"
STAGE_GROUPS: dict[str, str] = {
    "lock": "checks",
    "sync": "checks",
    "fingerprint": "checks",
    "ruff": "checks",
    "mypy": "checks",
    "bandit": "checks",
    "worker": "checks",
    "pytest": "tests",
    "image": "image",
    "scan": "image",
    "sbom": "image",
    "deploy": "delivery",
    "health": "delivery",
    "record": "delivery",
}
"""CI stage -> the group whose status shows it (an unknown stage shows under checks)."""
GROUPS = ("checks", "tests", "image", "delivery")
REQUIRED_CONTEXTS = (f"{CONTEXT_PREFIX}/checks", f"{CONTEXT_PREFIX}/tests")
"""The contexts branch protection requires: every CI run sets both."""
SUMMARY_MARKER = "<!-- elice-ci-summary -->"
"""The first line of the pull request's summary comment: how the next run finds it."""
MAX_DESCRIPTION = 140  # GitHub refuses a longer status description
MAX_COMMENT = 60_000  # GitHub's limit is 65,536 characters

StatusState = Literal["error", "failure", "pending", "success"]
_PULL_REF = re.compile(r"^refs/pull/(\d+)/(?:merge|head)$")


def context_of(group: str) -> str:
    """The status context of a stage group."""
    return f"{CONTEXT_PREFIX}/{group}"


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_DESCRIPTION else text[: MAX_DESCRIPTION - 3] + "..."


def _group_status(results: list[StageResult]) -> tuple[StatusState, str]:
    services = list(dict.fromkeys(r.service for r in results))
    failed = {r.service: r.stage for r in results if r.status == "failed"}
    if failed:
        each = ", ".join(f"{s} ({stage})" for s, stage in failed.items())
        return "failure", _short(f"{len(failed)} of {len(services)} failed: {each}")
    skipped = sum(
        1 for s in services if all(r.status == "skipped" for r in results if r.service == s)
    )
    text = f"{len(services) - skipped} services passed"
    return "success", _short(text + (f", {skipped} skipped" if skipped else ""))


def group_statuses(outcome: CiOutcome) -> dict[str, tuple[StatusState, str]]:
    """Each context's state and description for `outcome`; the required ones always."""
    if outcome.nothing_to_do:
        return dict.fromkeys(REQUIRED_CONTEXTS, ("success", "no service affected"))
    grouped: dict[str, list[StageResult]] = {}
    for result in outcome.results:
        grouped.setdefault(STAGE_GROUPS.get(result.stage, "checks"), []).append(result)
    statuses = {context_of(g): _group_status(grouped[g]) for g in GROUPS if g in grouped}
    for context in REQUIRED_CONTEXTS:
        if context not in statuses:
            state: StatusState = "failure" if outcome.failed else "success"
            statuses[context] = (
                state,
                "not run: an earlier stage failed" if outcome.failed else "nothing to run",
            )
    return statuses


def set_commit_statuses(
    gh: GitHub[Any],
    repo: GitHubRepository,
    sha: str,
    statuses: dict[str, tuple[StatusState, str]],
    target_url: str | None,
) -> None:
    """One commit status per context on `sha`, each linking to `target_url`.

    Raises:
        GitHubRefused / GitHubUnavailable: GitHub refused or could not be reached.
    """
    for context, (state, description) in statuses.items():
        call(
            f"status {context}",
            gh.rest.repos.create_commit_status,
            repo.owner,
            repo.name,
            sha,
            state=state,
            context=context,
            description=_short(description),
            target_url=target_url,
        )


def pull_number(ref: str) -> int | None:
    """The pull request a ref belongs to (refs/pull/7/merge -> 7), None for any other."""
    match = _PULL_REF.match(ref)
    return int(match.group(1)) if match else None


def summary_comment(outcome: CiOutcome, run_url: str | None) -> str:
    """The pull request's summary of `outcome`: stages, coverage and findings per service."""
    title = f"CI of {outcome.commit[:12]}"
    if outcome.nothing_to_do:
        body = f"# {title}\n\n{outcome.message}\n"
    else:
        body = markdown_report(outcome.results, title=title)
    link = f"\n\n[The Prefect run]({run_url})\n" if run_url else "\n"
    text = f"{SUMMARY_MARKER}\n{body}"
    if len(text) + len(link) > MAX_COMMENT:
        text = text[: MAX_COMMENT - len(link) - 20] + "\n\n(cut short)"
    return text + link


def upsert_summary(gh: GitHub[Any], repo: GitHubRepository, number: int, body: str) -> int:
    """Edit the pull request's summary comment to `body`, or add it; returns its id.

    Raises:
        GitHubRefused / GitHubUnavailable: GitHub refused or could not be reached.
    """
    comments = collect(
        gh,
        "pull request comments",
        gh.rest.issues.list_comments,
        None,
        owner=repo.owner,
        repo=repo.name,
        issue_number=number,
    )
    for comment in comments:
        if str(comment.get("body", "")).startswith(SUMMARY_MARKER):
            call(
                "summary comment",
                gh.rest.issues.update_comment,
                repo.owner,
                repo.name,
                comment["id"],
                body=body,
            )
            return int(comment["id"])
    created = call(
        "summary comment", gh.rest.issues.create_comment, repo.owner, repo.name, number, body=body
    )
    return int(created["id"])

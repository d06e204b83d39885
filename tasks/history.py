"""An environment's releases, from its ledger's revisions, and a return to any of them.

Every ledger revision is kept (`tasks/releases.py`), so every release that ever served
an environment is on record with its images, the commit CI checked and who shipped it.
A release can be returned to when it is verified like a promotion: each of its commits is
on the protected branch of the pinned repository now (one fresh fetch), and each image's
digest is in the environment's own registry with the commit's revision label. The return
itself is deployed like a promotion: the intent written first, the services in waves,
each healthy on its digest, one ledger revision; any failure puts every service back.

    ledger_releases(history)                     every release, newest first
    judge_releases(releases, state, ...)         which serves, which can be returned to, why not
    plan_return(context, repository, release)    a verified plan, or PromotionRefused by name
    deploy_return(context, plan, ...)            the return, all or nothing
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

from prefect import task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.filesystems import WritableFileSystem
from pydantic import BaseModel, ConfigDict, Field

from blocks.repository import GitRepository
from core.errors import PipelineError, PromotionRefused
from core.ledger import EnvironmentState, ReleaseRecord
from core.records import PlannedChange, PromotionPlan, utcnow
from tasks.context import RunContext
from tasks.deploy import read_live_services, service_addresses
from tasks.deploy.waves import deploy_in_waves, undo_release
from tasks.health import check_service_health
from tasks.images import EnvironmentRegistry, login_for
from tasks.process import run_logger
from tasks.registry import verify_release_image
from tasks.releases import Ledger, begin_deploys, with_deploy, without_intent
from tasks.workspace import unreviewed_commits

HEALTH_DEADLINE_S = 30


class LedgerRelease(BaseModel):
    """One release as the ledger recorded it: its services' records, and when it came."""

    model_config = ConfigDict(frozen=True)

    release_id: str
    records: dict[str, ReleaseRecord] = Field(description="service -> its record")
    first_revision: int = Field(description="The revision that first recorded it")
    deployed_at: datetime = Field(description="When it first served")


class ReleaseStatus(BaseModel):
    """A release of the environment, judged now."""

    model_config = ConfigDict(frozen=True)

    release: LedgerRelease
    serving: list[str] = Field(description="Its services serving it now")
    problems: list[str] = Field(description="Why it cannot be returned to (none: it can)")

    @property
    def returnable(self) -> bool:
        """Whether `cicd rollback ENV --to` accepts it (one that fully serves is not)."""
        return not self.problems and len(self.serving) < len(self.release.records)


def ledger_releases(history: Sequence[EnvironmentState]) -> list[LedgerRelease]:
    """Every release the revisions record (serving or kept as previous), newest first.

    A service's record is taken from the latest revision that holds it (verified by then).
    """
    found: dict[str, dict[str, ReleaseRecord]] = {}
    first: dict[str, int] = {}
    since: dict[str, datetime] = {}
    for state in history:
        for record in [*state.previous.values(), *state.services.values()]:
            release_id = record.release_id
            found.setdefault(release_id, {})[record.service] = record
            first.setdefault(release_id, state.revision)
            since[release_id] = min(since.get(release_id, record.deployed_at), record.deployed_at)
    releases = [
        LedgerRelease(
            release_id=release_id,
            records=dict(sorted(records.items())),
            first_revision=first[release_id],
            deployed_at=since[release_id],
        )
        for release_id, records in found.items()
    ]
    return sorted(releases, key=lambda r: (r.first_revision, r.deployed_at), reverse=True)


def _record_problems(record: ReleaseRecord, known: Sequence[str]) -> list[str]:
    """What the record itself rules out (no registry or repository asked)."""
    name = record.service
    if name not in known:
        return [f"{name}: no longer in the configuration"]
    if not record.verified:
        return [f"{name}: never verified in {record.environment}"]
    if not record.commit:
        return [f"{name}: no commit recorded"]
    return []


def image_problem(record: ReleaseRecord, registry: EnvironmentRegistry) -> str | None:
    """Why `record`'s image cannot be deployed from the environment's registry; None: it can.

    The digest must be in that registry (the host the environment pulls from), with the
    recorded commit as its revision label.
    """
    image = record.image
    host = image.repository.split("/", 1)[0]
    if host != registry.access.address:
        return (
            f"{record.service}: {image.reference} is not in {record.environment}'s "
            f"registry {registry.access.address}"
        )
    try:
        verify_release_image.fn(image, login_for(image, registry.access))
    except PipelineError as exc:
        return f"{record.service}: image gone or unusable: {exc}"
    return None


def judge_releases(
    releases: Sequence[LedgerRelease],
    state: EnvironmentState,
    known: Sequence[str],
    unreviewed: Mapping[str, str],
    image_check: Callable[[ReleaseRecord], str | None],
) -> list[ReleaseStatus]:
    """Each release with what serves of it now and why it cannot be returned to.

    `unreviewed`: commit -> why the protected branch does not reach it (one fetch for
    all); `image_check`: a record -> why its image cannot be deployed (None: it can).
    """
    judged = []
    for release in releases:
        serving = [
            name
            for name, record in release.records.items()
            if (now := state.services.get(name)) is not None
            and now.image.digest == record.image.digest
        ]
        problems: list[str] = []
        for record in release.records.values():
            found = _record_problems(record, known)
            if not found and record.commit in unreviewed:
                found = [f"{record.service}: {unreviewed[record.commit]}"]
            if not found:
                found = [p for p in [image_check(record)] if p]
            problems += found
        judged.append(ReleaseStatus(release=release, serving=serving, problems=problems))
    return judged


def history_of(
    context: tuple[WritableFileSystem, Sequence[str]],
    env: str,
    repository: GitRepository,
    registry: EnvironmentRegistry,
) -> list[ReleaseStatus]:
    """Every release of `env`'s ledger, newest first, judged now (`cicd history`).

    `context` is (the ledger's store, the configured services' names). One fetch of the
    repository for every commit; one registry look per image.
    """
    store, known = context
    ledger = Ledger(store)
    releases = ledger_releases(ledger.history(env))
    commits = {r.commit for release in releases for r in release.records.values() if r.commit}
    return judge_releases(
        releases,
        ledger.current(env),
        known,
        unreviewed_commits(repository, sorted(commits)),
        lambda record: image_problem(record, registry),
    )


class ReturnPlan(BaseModel):
    """A verified return to a release: the plan deployed, and the records it restores."""

    model_config = ConfigDict(frozen=True)

    plan: PromotionPlan
    records: dict[str, ReleaseRecord]


def find_release(releases: Sequence[LedgerRelease], release_id: str, env: str) -> LedgerRelease:
    """The release called `release_id`.

    Raises:
        PromotionRefused: the ledger of `env` has no such release.
    """
    for release in releases:
        if release.release_id == release_id:
            return release
    msg = (
        f"release {release_id!r} is not in the ledger of {env}; "
        f"`cicd history {env}` lists the releases it can return to"
    )
    raise PromotionRefused(msg)


def _chosen(release: LedgerRelease, services: Sequence[str] | None) -> dict[str, ReleaseRecord]:
    if not services:
        return dict(release.records)
    missing = sorted(set(services) - set(release.records))
    if missing:
        msg = f"release {release.release_id} has no release of {missing}; nothing changed"
        raise PromotionRefused(msg)
    return {name: release.records[name] for name in services}


@task(cache_policy=NO_CACHE)
def plan_return(
    context: RunContext,
    repository: GitRepository,
    release_id: str,
    services: list[str] | None,
    requested_by: str,
) -> ReturnPlan:
    """The return of the environment to `release_id` (its `services` only, if given),
    verified like a promotion: every commit on the protected branch now (one fresh fetch),
    every image's digest in the environment's registry with that commit's label.

    Raises:
        PromotionRefused: the release is unknown, or cannot be returned to (naming each
            service and why), or already serves; nothing has changed.
        ToolError: the repository or the registry cannot be reached.
    """
    env, registry = context.env.name, context.registry
    assert registry is not None  # noqa: S101 - a rollback's context resolves it
    ledger = Ledger(context.ledger)
    release = find_release(ledger_releases(ledger.history(env)), release_id, env)
    records = _chosen(release, services)
    chosen = release.model_copy(update={"records": records})
    state = ledger.current(env)
    commits = [r.commit for r in records.values() if r.commit]
    status = judge_releases(
        [chosen],
        state,
        context.config.catalog.names(),
        unreviewed_commits(repository, commits),
        lambda record: image_problem(record, registry),
    )[0]
    if status.problems:
        msg = f"{env} cannot return to release {release_id}: " + "; ".join(status.problems)
        raise PromotionRefused(msg)
    if not status.returnable:
        msg = f"release {release_id} already serves {env} ({', '.join(status.serving)})"
        raise PromotionRefused(msg)
    changes = []
    for name, record in records.items():
        current = state.services.get(name)
        changes.append(
            PlannedChange(
                service=name,
                current_digest=current.image.digest if current else None,
                current_commit=current.image.commit if current else "",
                image=record.image,
                scan=record.scan,
                repository=record.repository,
                ref=record.ref,
                commit=record.commit,
            )
        )
    plan = PromotionPlan(
        environment=env,
        source_environment=env,
        release_id=release_id,
        changes=changes,
        promoted_by=requested_by,
    )
    run_logger().info("%s returns to release %s: verified %s", env, release_id, list(records))
    return ReturnPlan(plan=plan, records=records)


def returned_state(
    state: EnvironmentState, target: ReturnPlan, flow_run_id: str, requested_by: str
) -> EnvironmentState:
    """`state` with each service of `target` serving its recorded release again (what
    served before kept as previous), the intent of `flow_run_id` cleared."""
    for record in target.records.values():
        again = record.model_copy(
            update={"deployed_at": utcnow(), "flow_run_id": flow_run_id, "verified": True}
        )
        state = with_deploy(state, again)
    change = f"returned to release {target.plan.release_id} by {requested_by}"
    return without_intent(state, flow_run_id, change)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def record_return(
    context: RunContext, target: ReturnPlan, flow_run_id: str, requested_by: str
) -> EnvironmentState:
    """One ledger revision: the release serves again."""
    env = context.env.name
    return Ledger(context.ledger).update(
        env, lambda state: returned_state(state, target, flow_run_id, requested_by)
    )


def deploy_return(
    context: RunContext,
    target: ReturnPlan,
    run_id: str,
    requested_by: str,
    deadline_s: float = 60,
) -> dict[str, str | None]:
    """Deploy a verified return like a promotion, all or nothing: the intent first, the
    services in waves, each healthy on its digest, one ledger revision. Returns service
    -> digest serving now.

    Raises:
        PromotionRolledBack: a deploy or health check failed; what served before serves.
    """
    env, deploy_target, plan = context.env, context.deploy_target, target.plan
    specs = context.config.catalog.select(plan.services)
    live = read_live_services(deploy_target, env, specs)
    begin_deploys(context.ledger, plan, live, run_id)
    deployed: list[str] = []
    try:
        wave = context.settings.deploy_wave
        deploy_in_waves(deploy_target, env, specs, plan, live, deadline_s, deployed, wave)
        addresses = service_addresses(deploy_target, env, specs)
        checks = check_service_health.map(
            [addresses[spec.name] for spec in specs],
            specs,
            unmapped(HEALTH_DEADLINE_S),
            [plan.change(spec.name).new_digest for spec in specs],
        )
        for check in checks:
            check.result()
        record_return(context, target, run_id, requested_by)
    except BaseException as failure:
        record = (context.ledger, run_id)
        undone = undo_release(deploy_target, env, specs, live, plan, record, failure)
        if not isinstance(failure, Exception):
            raise
        raise undone from failure
    return {c.service: c.new_digest for c in plan.changes}

"""The release ledger: per environment, what serves, what served before, who approved it.

Every change writes a new immutable revision file `<env>/<revision:08d>.json`; nothing is
ever overwritten. Creation is exclusive (a hard link on a local disk, a conditional
`PutObject` with `If-None-Match: *` on S3), so two writers racing for revision N cannot
both win: the loser re-reads the ledger and re-applies its change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.filesystems import WritableFileSystem
from prefect.runtime import flow_run
from pydantic import BaseModel

from blocks.config import PipelineConfig
from blocks.environments import EnvironmentSpec
from blocks.repository import GitRepository
from core.errors import (
    ConfigError,
    LedgerConflict,
    LedgerError,
    LedgerUnavailable,
    PromotionRefused,
)
from core.ledger import (
    DeployIntent,
    EnvironmentState,
    ReleaseRecord,
    check_environment_name,
    revision_path,
)
from core.records import (
    DeployedService,
    DeployOutcome,
    PlannedChange,
    PromotionPlan,
    SecurityVerdict,
    Workspace,
    make_plan,
    utcnow,
)
from tasks.local_store import LedgerReader
from tasks.performance import Baseline, baseline_record
from tasks.process import run_logger
from tasks.security import ScanReport
from tasks.stores import open_store
from tasks.workspace import unreviewed_commits, verify_reviewed


def retry_on_ledger_outage(task: object, task_run: object, state: State[Any]) -> bool:  # noqa: ARG001
    """Prefect retry condition: retry when the ledger's store did not answer, or another
    writer won every race; a refusal (403, a full or read-only disk, a rule) is final."""
    try:
        state.result()
    except (LedgerUnavailable, LedgerConflict):
        return True
    except Exception:  # noqa: BLE001 - anything else is not worth a retry
        return False
    return False


LEDGER_RETRIES: dict[str, Any] = {
    "retries": 2,
    "retry_delay_seconds": [1, 4],
    "retry_condition_fn": retry_on_ledger_outage,
}
"""Task options of a ledger write: on top of the store client's own budget
(`tasks.stores.CLIENT_CONFIG`), two more rounds for an outage that outlasts it."""

MAX_ATTEMPTS = 8


# --- the ledger -----------------------------------------------------------------------


class Ledger(LedgerReader):
    """Per-environment release ledger with immutable, exclusively created revisions."""

    def __init__(self, store: WritableFileSystem, *, max_attempts: int = MAX_ATTEMPTS):
        """The ledger in `store`: the filesystem a run resolved once (`ledger_filesystem`)."""
        if max_attempts < 1:
            msg = f"max_attempts must be at least 1, got {max_attempts}"
            raise ValueError(msg)
        super().__init__(open_store(store))
        self.max_attempts = max_attempts

    def update(
        self, env: str, change: Callable[[EnvironmentState], EnvironmentState]
    ) -> EnvironmentState:
        """Apply `change` to the latest revision and write the result as the next one.

        `change` may run more than once (after losing a race), so it must be pure.

        Raises:
            LedgerConflict: every attempt lost the race to another writer.
            ValueError: `env` is not a valid environment name.
        """
        check_environment_name(env)
        for _ in range(self.max_attempts):
            latest = self.current(env)
            changed = change(latest.model_copy(deep=True))
            written = changed.model_copy(
                update={"environment": env, "revision": latest.revision + 1, "updated_at": utcnow()}
            )
            # Re-validate: `change` may have built records by hand.
            written = EnvironmentState.model_validate(written.model_dump())
            data = written.model_dump_json(indent=2).encode()
            path = revision_path(env, written.revision)
            # Taken: by another writer, or by this very write (an attempt whose answer was
            # lost, yet the store finished it); the bytes say which.
            if self.store.create(path, data) or self.store.read(path) == data:
                return written
        msg = (
            f"ledger {env}: {self.max_attempts} attempts lost the race for the next revision; "
            "another deploy is writing this environment, retry when it has finished"
        )
        raise LedgerConflict(msg)

    def last_intent_of(self, env: str, flow_run_id: str) -> EnvironmentState | None:
        """The latest revision holding the intent of `flow_run_id` (None: there is none).

        Read from the latest revision back: the intent is written shortly before.
        """
        for number in reversed(self._revisions(env)):
            state = self._read(env, number)
            if state.in_progress is not None and state.in_progress.flow_run_id == flow_run_id:
                return state
        return None

    def record_deploy(self, env: str, record: ReleaseRecord) -> EnvironmentState:
        """`record` now serves; the record it replaces becomes the service's previous one.

        Raises:
            ValueError: the record belongs to another environment.
        """
        if record.environment != env:
            msg = f"record for {record.environment!r} cannot be written to ledger {env!r}"
            raise ValueError(msg)
        return self.update(env, lambda state: with_deploy(state, record))

    def mark_verified(
        self,
        env: str,
        service: str,
        baseline: dict[str, float] | None,
        *,
        release_id: str | None = None,
    ) -> EnvironmentState:
        """Mark what serves `service` as verified, with its performance baseline.

        Raises:
            LedgerError: nothing serves `service`, or (with `release_id`) another release does.
        """
        return self.update(env, lambda state: with_verified(state, service, baseline, release_id))

    def restore_previous(self, env: str, service: str) -> EnvironmentState:
        """Rollback bookkeeping: the previous record serves again (none: the service is gone).

        Raises:
            LedgerError: there is nothing to roll back (neither current nor previous record).
        """
        return self.update(env, lambda state: with_previous_restored(state, service))


def with_deploy(state: EnvironmentState, record: ReleaseRecord) -> EnvironmentState:
    """`state` with `record` serving and the replaced record kept as previous."""
    services = dict(state.services)
    previous = dict(state.previous)
    old = services.get(record.service)
    if old is not None and old.image.digest != record.image.digest:
        previous[record.service] = old
    elif old is None:
        previous.pop(record.service, None)
    # Re-deploying the same digest keeps the earlier previous: a rollback target must differ.
    services[record.service] = record
    return state.model_copy(update={"services": services, "previous": previous})


def with_verified(
    state: EnvironmentState,
    service: str,
    baseline: dict[str, float] | None,
    release_id: str | None = None,
) -> EnvironmentState:
    """`state` with the serving record of `service` marked verified."""
    record = state.services.get(service)
    if record is None:
        msg = f"ledger {state.environment}: nothing serves {service}, cannot mark it verified"
        raise LedgerError(msg)
    if release_id is not None and record.release_id != release_id:
        msg = (
            f"ledger {state.environment}: {service} is served by release {record.release_id}, "
            f"not {release_id}; not marking it verified"
        )
        raise LedgerError(msg)
    services = {
        **state.services,
        service: record.model_copy(update={"verified": True, "baseline": baseline}),
    }
    return state.model_copy(update={"services": services})


def with_previous_restored(state: EnvironmentState, service: str) -> EnvironmentState:
    """`state` after rolling `service` back to its previous record.

    The previous entry is consumed: a second rollback cannot flip back to the bad release.
    """
    if service not in state.services and service not in state.previous:
        msg = f"ledger {state.environment}: no record of {service}, nothing to roll back"
        raise LedgerError(msg)
    services = dict(state.services)
    previous = dict(state.previous)
    restored = previous.pop(service, None)
    if restored is None:
        services.pop(service, None)
    else:
        services[service] = restored
    return state.model_copy(update={"services": services, "previous": previous})


def ledger_markdown(state: EnvironmentState) -> str:
    """The ledger revision as a Markdown table (one row per service)."""
    lines = [
        f"# Release ledger: {state.environment}",
        "",
        f"Revision {state.revision}, updated {state.updated_at:%Y-%m-%d %H:%M:%S %Z}"
        + (f": {_cell(state.change)}." if state.change else "."),
        "",
    ]
    if state.in_progress is not None:
        pending = state.in_progress
        lines.append(
            f"**Deploying release {_cell(pending.release_id)}** (run {pending.flow_run_id}, "
            f"since {pending.started_at:%Y-%m-%d %H:%M:%S %Z})."
        )
        lines.append("")
    if not state.services:
        lines.append("_Nothing deployed._")
        return "\n".join(lines) + "\n"
    lines += [
        "| service | digest | release | deployed | verified | approved by | scan | previous |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in sorted(state.services):
        rec = state.services[name]
        prev = state.previous.get(name)
        cells = [
            name,
            f"`{rec.image.short}`",
            _cell(rec.release_id),
            f"{rec.deployed_at:%Y-%m-%d %H:%M}",
            "yes" if rec.verified else "no",
            _cell(rec.approved_by or "-"),
            rec.scan or "-",
            f"`{prev.image.short}` ({_cell(prev.release_id)})" if prev else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


@task(retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def publish_ledger_artifact(
    store: WritableFileSystem, env: str, state: EnvironmentState | None = None
) -> str:
    """Publish the ledger of `env` as a markdown artifact keyed `ledger-<env>`; returns its id."""
    check_environment_name(env)
    current = state if state is not None else Ledger(store).current(env)
    artifact_id = create_markdown_artifact(
        markdown=ledger_markdown(current),
        key=f"ledger-{env}",
        description=f"Release ledger of {env}, revision {current.revision}",
    )
    run_logger().info("ledger %s: revision %s published", env, current.revision)
    return str(artifact_id)


# --- CI: a verified release of one service -----------------------------------------


class LedgerEntry(BaseModel):
    """The ledger revision a CI deploy was recorded in."""

    environment: str
    revision: int
    changed: bool

    def summary_line(self) -> str:
        """One line for the CI report."""
        how = "recorded" if self.changed else "already recorded"
        return f"{how} in the {self.environment} ledger (revision {self.revision})"

    def report_details(self) -> dict[str, int]:
        """Columns for the CI report."""
        return {"revision": self.revision}


@task(task_run_name="record_release-{outcome.deployed.service}", **LEDGER_RETRIES)
def record_release(
    outcome: DeployOutcome,
    scan: ScanReport | None,
    workspace: Workspace,
    store: WritableFileSystem,
    repository: GitRepository,
) -> LedgerEntry:
    """Record the deployed, health-checked release in the environment's ledger.

    The commit is checked again against a fresh fetch of `repository` (the pinned one)
    right before the write: the checkout judged it minutes ago, and a force-push since
    may have taken it off the protected branch.

    Raises:
        PromotionRefused: the workspace's commit is not on the protected branch.
        UnreviewedCommit: the commit is not on it now (after the fresh fetch).
        ToolError: the repository cannot be reached.
        LedgerUnavailable: the ledger's store did not answer, after the task's retries
            (on top of the store client's own): the release serves but is not recorded.
    """
    if not workspace.protected:
        msg = f"{workspace.commit[:12]} is not on {workspace.protected_branch}: not recorded"
        raise PromotionRefused(msg)
    verify_reviewed(repository, workspace.commit)
    deployed = outcome.deployed
    run_id = flow_run.get_id()
    record = ReleaseRecord(
        service=deployed.service,
        environment=deployed.environment,
        image=deployed.image,
        release_id=f"ci-{deployed.image.version}",
        deployed_at=deployed.deployed_at,
        flow_run_id=run_id,
        verified=True,
        scan=scan.verdict if scan else None,
        repository=repository.label,
        ref=repository.protected_ref,
        commit=workspace.commit,
    )
    ledger = Ledger(store)
    state = ledger.current(deployed.environment)
    current = state.services.get(deployed.service)
    if current is not None and current.image.digest == record.image.digest and current.verified:
        return LedgerEntry(environment=state.environment, revision=state.revision, changed=False)
    state = ledger.record_deploy(deployed.environment, record)
    return LedgerEntry(environment=state.environment, revision=state.revision, changed=True)


# --- promotion: plans from the ledger, and what a promotion records ---------------------


def source_of(config: PipelineConfig, target_env: str) -> EnvironmentSpec:
    """The environment promoted into, which must have a source environment.

    Raises:
        PromotionRefused: unknown, or not promoted into (CI deploys it directly).
    """
    try:
        env = config.environment(target_env)
    except ConfigError as exc:
        raise PromotionRefused(str(exc)) from exc
    if env.promotes_from is None:
        msg = f"{env.name} is not promoted into (no promotes_from); CI deploys it directly"
        raise PromotionRefused(msg)
    return env


def _chosen(
    config: PipelineConfig,
    services: list[str] | None,
    source: EnvironmentState,
    source_env: str,
) -> list[str]:
    """The services to promote: those named, else every one the source ledger records.

    Raises:
        PromotionRefused: an empty or unknown service list, or nothing recorded.
    """
    if services is not None:
        if not services:
            msg = "no services given; omit --services to promote every verified service"
            raise PromotionRefused(msg)
        try:
            chosen = [s.name for s in config.catalog.select(services)]
        except ConfigError as exc:
            raise PromotionRefused(str(exc)) from exc
    else:
        chosen = [n for n in config.catalog.names() if n in source.services]
    if not chosen:
        msg = f"nothing to promote: no release is recorded in {source_env}"
        raise PromotionRefused(msg)
    return chosen


def _check_releases(
    source: EnvironmentState,
    chosen: list[str],
    target_env: str,
    source_env: str,
    protected_branch: str,
) -> None:
    """Every chosen release is deployed, verified and shipped from the protected branch.

    Raises:
        PromotionRefused: naming every release that is not.
    """
    problems = []
    for name in chosen:
        record = source.services.get(name)
        if record is None:
            problems.append(f"{name}: nothing deployed in {source_env}")
        elif not record.verified:
            problems.append(
                f"{name}: release {record.release_id} ({record.image.short}) is not verified "
                f"in {source_env}"
            )
        elif record.ref != f"refs/heads/{protected_branch}":
            problems.append(
                f"{name}: release {record.release_id} ({record.image.short}) was not shipped "
                f"from the protected branch {protected_branch} ({record.ref or 'no ref recorded'})"
            )
    if problems:
        msg = f"refusing to promote into {target_env}: " + "; ".join(problems)
        raise PromotionRefused(msg)


def build_plan(
    config: PipelineConfig,
    target_env: str,
    services: list[str] | None,
    promoted_by: str,
    source: EnvironmentState,
    target: EnvironmentState,
    *,
    protected_branch: str = "main",
) -> PromotionPlan:
    """The plan for promoting `services` from the source ledger into `target_env`.

    Raises:
        PromotionRefused: unknown environment or service, no source environment,
            unverified or missing releases, releases not shipped from the protected
            branch, or nobody allowed to approve.
    """
    env = source_of(config, target_env)
    if env.promotes_from is None:
        msg = f"{env.name} is not promoted into (no promotes_from); CI deploys it directly"
        raise PromotionRefused(msg)
    if source.environment != env.promotes_from or target.environment != env.name:
        msg = (
            f"ledgers of {source.environment}/{target.environment} given for "
            f"{env.promotes_from}/{env.name}"
        )
        raise ValueError(msg)
    if not promoted_by.strip():
        msg = "promoted_by is empty: say who promotes"
        raise PromotionRefused(msg)
    chosen = _chosen(config, services, source, env.promotes_from)
    _check_releases(source, chosen, env.name, env.promotes_from, protected_branch)
    changes = []
    for name in chosen:
        record = source.services[name]
        current = target.services.get(name)
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
    return make_plan(env.name, env.promotes_from, changes, promoted_by)


def promoted_state(
    state: EnvironmentState,
    plan: PromotionPlan,
    baselines: Mapping[str, Baseline],
    *,
    approved_by: str | None,
    verdict: SecurityVerdict,
    flow_run_id: str | None,
) -> EnvironmentState:
    """`state` with every planned service serving its new, verified release."""
    for change in plan.changes:
        fields: dict[str, Any] = {
            "service": change.service,
            "environment": plan.environment,
            "image": change.image,
            "release_id": plan.release_id,
            "flow_run_id": flow_run_id,
            "approved_by": approved_by,
            "promoted_by": plan.promoted_by,
            "scan": verdict.scans.get(change.service),
            "repository": change.repository,
            "ref": change.ref,
            "commit": change.commit,
        }
        if change.service in verdict.overridden:
            fields["scan_override"] = verdict.override_reason
        base = baselines.get(change.service)
        if base is not None and base.analysis is not None:
            fields["analysis"] = base.analysis
        state = with_deploy(state, ReleaseRecord(**fields))
        state = with_verified(
            state, change.service, baseline_record(base) if base else None, plan.release_id
        )
    return state.model_copy(
        update={
            "in_progress": None,
            "change": f"release {plan.release_id} promoted from {plan.source_environment}",
        }
    )


@task(cache_policy=NO_CACHE)
def read_ledger(store: WritableFileSystem, environment: str) -> EnvironmentState:
    """The latest ledger revision of `environment`."""
    return Ledger(store).current(environment)


@task(cache_policy=NO_CACHE)
def plan_promotion(
    store: WritableFileSystem,
    config: PipelineConfig,
    target_env: str,
    services: list[str] | None,
    promoted_by: str,
    protected_branch: str = "main",
) -> PromotionPlan:
    """Plan from the ledgers: the verified releases of the source environment.

    Raises:
        PromotionRefused: see `build_plan`; nothing has changed.
    """
    env = source_of(config, target_env)
    ledger = Ledger(store)
    plan = build_plan(
        config,
        target_env,
        services,
        promoted_by,
        ledger.current(str(env.promotes_from)),
        ledger.current(env.name),
        protected_branch=protected_branch,
    )
    run_logger().info(
        "promotion %s into %s: %s",
        plan.release_id,
        plan.environment,
        ", ".join(f"{c.service} {c.image.short}" for c in plan.changes),
    )
    return plan


@task(cache_policy=NO_CACHE)
def check_reviewed(plan: PromotionPlan, repository: GitRepository) -> PromotionPlan:
    """`plan` when every release in it was built from a commit its protected branch reaches now.

    The ledger says which commit CI checked; whether that commit is reviewed is the pinned
    repository's to say, after one fresh fetch for the whole plan: a record written before
    a force-push, or planted naming a commit nobody reviewed, is refused here, before any
    image is copied, the gate asks anyone or anything is backed up or deployed.

    Raises:
        PromotionRefused: naming each such service, its image and the full SHA.
        ToolError: the repository cannot be reached.
    """
    missing = [c for c in plan.changes if not c.commit]
    found = unreviewed_commits(repository, [c.commit for c in plan.changes if c.commit])
    problems = [f"{c.service} ({c.image.short}): no commit recorded" for c in missing]
    problems += [
        f"{c.service} ({c.image.short}): {found[c.commit]}"
        for c in plan.changes
        if c.commit in found
    ]
    if problems:
        msg = f"refusing to promote into {plan.environment}: " + "; ".join(problems)
        raise PromotionRefused(msg)
    run_logger().info(
        "promotion %s: every commit is on %s of %s",
        plan.release_id,
        repository.protected_branch,
        repository.label,
    )
    return plan


@task(cache_policy=NO_CACHE, **LEDGER_RETRIES)
def record_promotion(
    store: WritableFileSystem,
    plan: PromotionPlan,
    baselines: dict[str, Baseline],
    approved_by: str | None,
    verdict: SecurityVerdict,
    flow_run_id: str | None,
) -> EnvironmentState:
    """Write the promotion to the target's ledger in one revision: deployed and verified."""
    state = Ledger(store).update(
        plan.environment,
        lambda current: promoted_state(
            current,
            plan,
            baselines,
            approved_by=approved_by,
            verdict=verdict,
            flow_run_id=flow_run_id,
        ),
    )
    run_logger().info(
        "ledger %s: revision %d records release %s",
        plan.environment,
        state.revision,
        plan.release_id,
    )
    return state


def with_intent(state: EnvironmentState, intent: DeployIntent) -> EnvironmentState:
    """`state` with `intent` under way.

    Raises:
        LedgerError: another run's deploys are under way (or were never recovered).
    """
    pending = state.in_progress
    if pending is not None and pending.flow_run_id != intent.flow_run_id:
        msg = (
            f"ledger {state.environment}: run {pending.flow_run_id} is still recorded as "
            f"deploying release {pending.release_id}; recover it first"
        )
        raise LedgerError(msg)
    return state.model_copy(
        update={
            "in_progress": intent,
            "change": f"run {intent.flow_run_id} begins deploying release {intent.release_id}",
        }
    )


def without_intent(
    state: EnvironmentState,
    flow_run_id: str,
    change: str,
    before: EnvironmentState | None = None,
) -> EnvironmentState:
    """`state` with the intent of `flow_run_id` cleared (its deploys were undone).

    A record of that run found instead of its intent was written late: the run gave up on
    it (its store timed out) but the store finished the write. `before`, the revision
    that held the intent, then says what each service it recorded goes back to.
    """
    pending = state.in_progress
    if pending is not None and pending.flow_run_id == flow_run_id:
        return state.model_copy(update={"in_progress": None, "change": change})
    late = sorted(n for n, r in state.services.items() if r.flow_run_id == flow_run_id)
    if pending is not None or not late or before is None:
        msg = f"ledger {state.environment}: run {flow_run_id} has no deploys under way"
        raise LedgerError(msg)
    services, previous = dict(state.services), dict(state.previous)
    for name in late:
        for now, then in ((services, before.services), (previous, before.previous)):
            if name in then:
                now[name] = then[name]
            else:
                now.pop(name, None)
    note = f"{change} (its record of {', '.join(late)}, written after the run gave up, undone)"
    return state.model_copy(
        update={"services": services, "previous": previous, "in_progress": None, "change": note}
    )


@task(cache_policy=NO_CACHE, **LEDGER_RETRIES)
def begin_deploys(
    store: WritableFileSystem,
    plan: PromotionPlan,
    previous: Mapping[str, DeployedService | None],
    flow_run_id: str,
) -> EnvironmentState:
    """Record in the ledger, before the first deploy, what is about to change and from what."""
    intent = DeployIntent(
        release_id=plan.release_id,
        flow_run_id=flow_run_id,
        images={c.service: c.image for c in plan.changes},
        previous={c.service: previous.get(c.service) for c in plan.changes},
    )
    return Ledger(store).update(plan.environment, lambda state: with_intent(state, intent))


@task(cache_policy=NO_CACHE, **LEDGER_RETRIES)
def begin_rollback(
    store: WritableFileSystem,
    environment: str,
    serving: Mapping[str, DeployedService | None],
    flow_run_id: str,
) -> EnvironmentState:
    """Record, before the first restore, which services go back to their previous release
    and what serves them now: a rollback that dies mid-way is put back like a promotion."""

    def intend(state: EnvironmentState) -> EnvironmentState:
        missing = sorted(name for name in serving if name not in state.previous)
        if missing:
            msg = f"the ledger of {environment} keeps no previous release of {missing}"
            raise PromotionRefused(msg)
        intent = DeployIntent(
            release_id=f"rollback-{flow_run_id[:8]}",
            flow_run_id=flow_run_id,
            images={name: state.previous[name].image for name in serving},
            previous=dict(serving),
        )
        return with_intent(state, intent)

    return Ledger(store).update(environment, intend)


@task(cache_policy=NO_CACHE, **LEDGER_RETRIES)
def finish_rollback(
    store: WritableFileSystem, environment: str, services: list[str], flow_run_id: str, change: str
) -> EnvironmentState:
    """One revision: each service's previous release serves again, the intent cleared."""

    def done(state: EnvironmentState) -> EnvironmentState:
        for name in services:
            state = with_previous_restored(state, name)
        return without_intent(state, flow_run_id, change)

    return Ledger(store).update(environment, done)


@task(cache_policy=NO_CACHE, **LEDGER_RETRIES)
def end_deploys(
    store: WritableFileSystem, environment: str, flow_run_id: str, change: str
) -> EnvironmentState:
    """Clear the intent of `flow_run_id`: its deploys were undone, the old release serves.

    A record of the run that landed after the run gave up on it is undone too.
    """
    ledger = Ledger(store)
    found: list[EnvironmentState | None] = []

    def before() -> EnvironmentState | None:
        if not found:
            found.append(ledger.last_intent_of(environment, flow_run_id))
        return found[0]

    def clear(state: EnvironmentState) -> EnvironmentState:
        late = state.in_progress is None and any(
            r.flow_run_id == flow_run_id for r in state.services.values()
        )
        return without_intent(state, flow_run_id, change, before() if late else None)

    return ledger.update(environment, clear)

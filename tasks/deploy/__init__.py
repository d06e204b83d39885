"""Deploys: put a release into an environment through its target, and take it back.

The package holds one module per part: `target` (the Deployer protocol and the target
resolved once per run), `docker` and `kubernetes` (the two targets), `manifests` (the
Kubernetes manifests the kubernetes target applies). The tasks the flows call live
here; each takes the resolved `DeployTarget`, never a name to look up.
"""

from __future__ import annotations

from collections.abc import Mapping

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.filesystems import WritableFileSystem

from blocks.catalog import ServiceSpec
from blocks.environments import EnvironmentSpec
from core.errors import LedgerError, PipelineError, PromotionError, PromotionRefused
from core.ledger import EnvironmentState
from core.records import DeployedService, DeployOutcome, ImageRef, PublishedImage, short_digest
from tasks.deploy.target import Deployer, DeployTarget
from tasks.health import probe_health
from tasks.locks import check_deploy_lock, deploy_lock, mark_crashed
from tasks.process import run_logger
from tasks.releases import Ledger, LedgerEntry, end_deploys, read_ledger

LOOK_S = 2.0
"""How long the look before the lock waits for a healthy answer (a failing look deploys)."""


@task(task_run_name="deploy_service-{service.name}-{env.name}")
def deploy_service(
    deploy_target: DeployTarget,
    env: EnvironmentSpec,
    service: ServiceSpec,
    published: PublishedImage,
    *,
    deadline_s: float = 90.0,
) -> DeployOutcome:
    """CI's deploy: the image, unless exactly that digest already serves there healthily.

    A deploy holds `deploy-<env>` while it looks again and deploys: deploys into one
    environment are serialised across runs (and wait for a promotion or rollback of it).
    The first look takes no lock: it only reads, and a rerun whose every digest already
    serves then deploys nothing without queueing for the lock service by service.
    """
    deployer = deploy_target.deployer()
    now = deployer.live(env, service)
    live = _already_serving(now, service, published.image, deadline_s=LOOK_S)
    if live is not None:
        return DeployOutcome(deployed=live, changed=False)
    with deploy_lock(env.name):
        return _deploy_unless_serving(deployer, env, service, published.image, deadline_s)


def _already_serving(
    live: DeployedService | None,
    service: ServiceSpec,
    image: ImageRef,
    *,
    deadline_s: float,
    warn: bool = False,
) -> DeployedService | None:
    """`live` (what serves `service` now) when it is exactly `image`, answering healthily."""
    if live is None or live.image.digest != image.digest:
        return None
    probe = probe_health(live.address, service, deadline_s=deadline_s, expect_digest=image.digest)
    if probe.ok:
        run_logger().info("%s %s already serves in %s", service.name, image.short, live.environment)
        return live
    if warn:
        run_logger().warning(
            "%s %s should serve in %s but does not answer (%s): deploying it again",
            service.name,
            image.short,
            live.environment,
            "; ".join(probe.failures),
        )
    return None


def _deploy_unless_serving(
    deployer: Deployer,
    env: EnvironmentSpec,
    service: ServiceSpec,
    image: ImageRef,
    deadline_s: float,
) -> DeployOutcome:
    before = deployer.live(env, service)
    live = _already_serving(before, service, image, deadline_s=5, warn=True)
    if live is not None:
        return DeployOutcome(deployed=live, changed=False)
    check_deploy_lock(f"before deploying {service.name}")
    deployed = deployer.deploy(env, service, image, deadline_s=deadline_s)
    run_logger().info(
        "%s %s deployed to %s at %s", service.name, image.short, env.name, deployed.address
    )
    return DeployOutcome(deployed=deployed, changed=True, previous=before)


@task(task_run_name="settle_record-{service.name}-{env.name}", cache_policy=NO_CACHE)
def settle_record(
    deploy_target: DeployTarget,
    env: EnvironmentSpec,
    service: ServiceSpec,
    outcome: DeployOutcome,
    recorded: LedgerEntry | BaseException | None,
) -> LedgerEntry:
    """CI's record stage as the report shows it: the ledger entry, or, when the record
    failed (`recorded` is its error, after its retries), the deploy undone.

    A release the ledger does not name must not serve: promotions read what dev serves
    from the ledger. Under `deploy-<env>`, what served before the deploy is put back
    and checked, unless another run has deployed the service since.

    Raises:
        LedgerError: the record failed; the message names its cause and what serves now.
    """
    if isinstance(recorded, LedgerEntry):
        return recorded
    cause = recorded if recorded is not None else "the record did not run"
    if not outcome.changed:
        raise _unrecorded(f"{cause}; nothing was deployed by this run, nothing to undo", recorded)
    deployed, before = outcome.deployed, outcome.previous
    deployer = deploy_target.deployer()
    with deploy_lock(env.name):
        live = deployer.live(env, service)
        if live is None or live.image.digest != deployed.image.digest:
            now = live.image.short if live else "nothing"
            note = f"{service.name} in {env.name} now runs {now} (another run's): left as it is"
            raise _unrecorded(f"{cause}; {note}", recorded)
        run_logger().warning(
            "%s %s is not in the %s ledger: putting %s back",
            service.name,
            deployed.image.short,
            env.name,
            before.image.short if before else "nothing",
        )
        deployer.restore(env, service, before)
        restored = confirm_restored.fn(deploy_target, env, [service], {service.name: before})
    raise _unrecorded(rollback_message(cause, restored), recorded)


def _unrecorded(message: object, cause: BaseException | None) -> LedgerError:
    error = LedgerError(f"not recorded: {message}")
    error.__cause__ = cause
    return error


@task(cache_policy=NO_CACHE)
def read_live_services(
    deploy_target: DeployTarget, env: EnvironmentSpec, services: list[ServiceSpec]
) -> dict[str, DeployedService | None]:
    """What serves each service in `env` right now."""
    deployer = deploy_target.deployer()
    return {svc.name: deployer.live(env, svc) for svc in services}


@task(cache_policy=NO_CACHE)
def service_addresses(
    deploy_target: DeployTarget, env: EnvironmentSpec, services: list[ServiceSpec]
) -> dict[str, str]:
    """Where each service answers in `env`."""
    deployer = deploy_target.deployer()
    return {svc.name: deployer.address(env, svc) for svc in services}


@task(cache_policy=NO_CACHE)
def refresh_pull_credentials(deploy_target: DeployTarget, env: EnvironmentSpec) -> str | None:
    """Renew the pull credentials `env` keeps (the kubernetes target's pull secret) if
    they no longer serve; why they were written, None when nothing was.

    Raises:
        DeployError: they could not be read or written (no credential in the message).
    """
    return deploy_target.deployer().refresh_pull_credentials(env)


@task(task_run_name="deploy_release-{service.name}-{env.name}", cache_policy=NO_CACHE)
def deploy_release(
    deploy_target: DeployTarget,
    env: EnvironmentSpec,
    service: ServiceSpec,
    image: ImageRef,
    deadline_s: float = 60,
) -> DeployedService:
    """Deploy `image` (if the release fails later, the flow puts the previous one back:
    `restore_environment`).

    Raises:
        DeployError: it did not become healthy (the target already restored the previous
            release of this service).
    """
    return deploy_target.deployer().deploy(env, service, image, deadline_s=deadline_s)


@task(cache_policy=NO_CACHE)
def restore_environment(
    deploy_target: DeployTarget,
    env: EnvironmentSpec,
    services: list[ServiceSpec],
    previous: Mapping[str, DeployedService | None],
) -> list[str]:
    """Undo a failed release: wherever something other than `previous` serves now, put
    `previous` back (None: remove the service). Returns the services it put back.

    A service that cannot be read or put back is logged; the others are still restored.

    Raises:
        PromotionError: a service could not be put back (naming each and why).
    """
    deployer = deploy_target.deployer()
    logger = run_logger()
    restored = []
    failed = []
    for svc in services:
        before = previous.get(svc.name)
        try:
            now = deployer.live(env, svc)
            if (now.image.digest if now else None) == (before.image.digest if before else None):
                continue
            logger.warning(
                "rolling back %s in %s to %s",
                svc.name,
                env.name,
                before.image.short if before else "nothing",
            )
            deployer.restore(env, svc, before)
        except PipelineError as exc:
            logger.error(  # noqa: TRY400 - the error is the message; no traceback
                "%s in %s: could not put the previous release back: %s", svc.name, env.name, exc
            )
            failed.append(f"{svc.name}: {exc}")
            continue
        restored.append(svc.name)
    if failed:
        msg = f"rollback in {env.name} incomplete: " + "; ".join(failed)
        raise PromotionError(msg)
    return restored


@task(cache_policy=NO_CACHE)
def confirm_restored(
    deploy_target: DeployTarget,
    env: EnvironmentSpec,
    services: list[ServiceSpec],
    previous: Mapping[str, DeployedService | None],
    deadline_s: float = 30,
) -> dict[str, str | None]:
    """After a rollback: each service serves its previous digest again (or is gone).

    Returns service -> digest now serving (None: not deployed).

    Raises:
        PromotionError: a service does not serve what it served before the promotion.
    """
    deployer = deploy_target.deployer()
    problems = []
    serving: dict[str, str | None] = {}
    for svc in services:
        before = previous.get(svc.name)
        if before is None:
            live = deployer.live(env, svc)
            serving[svc.name] = live.image.digest if live else None
            if live is not None:
                problems.append(f"{svc.name}: {live.image.short} still runs, expected nothing")
            continue
        result = probe_health(
            deployer.address(env, svc),
            svc,
            deadline_s=deadline_s,
            expect_digest=before.image.digest,
        )
        serving[svc.name] = before.image.digest if result.ok else None
        if not result.ok:
            problems.append(f"{svc.name}: {'; '.join(result.failures)}")
    if problems:
        msg = f"rollback in {env.name} incomplete: " + "; ".join(problems)
        raise PromotionError(msg)
    run_logger().info("previous releases serve again in %s: %s", env.name, serving)
    return serving


def rollback_message(failure: BaseException | str, restored: Mapping[str, str | None]) -> str:
    """What a rolled-back promotion says: what failed, and what serves again."""
    back = ", ".join(
        f"{svc} {short_digest(digest) if digest else '(removed)'}"
        for svc, digest in sorted(restored.items())
    )
    return f"rolled back: {failure}; serving again: {back}"


@task(task_run_name="restore_service-{service.name}-{env.name}", cache_policy=NO_CACHE)
def restore_service(
    deploy_target: DeployTarget, env: EnvironmentSpec, service: ServiceSpec, state: EnvironmentState
) -> str:
    """Put back the release that served before the current one, as the ledger records it.

    Returns the digest now serving.

    Raises:
        PromotionRefused: the ledger has no previous release of `service` in `env`.
    """
    previous = state.previous.get(service.name)
    current = state.services.get(service.name)
    if previous is None:
        msg = f"{service.name}: the ledger of {env.name} keeps no previous release to return to"
        raise PromotionRefused(msg)
    deployer = deploy_target.deployer()
    deployer.restore(
        env,
        service,
        DeployedService(
            service=service.name,
            environment=env.name,
            image=previous.image,
            address=deployer.address(env, service),
        ),
    )
    run_logger().info(
        "%s in %s: %s -> %s (release %s)",
        service.name,
        env.name,
        current.image.short if current else "none",
        previous.image.short,
        previous.release_id,
    )
    return previous.image.digest


def _late_writer(state: EnvironmentState, before: EnvironmentState | None) -> str | None:
    """The run whose intent `before` (the revision under `state`) holds and whose record
    `state` is: a promotion's record, or one that landed after its run had given up."""
    intent = before.in_progress if before is not None else None
    if intent is None or state.in_progress is not None:
        return None
    recorded = {n for n, r in state.services.items() if r.flow_run_id == intent.flow_run_id}
    return intent.flow_run_id if recorded else None


def _undo_late_record(
    store: WritableFileSystem,
    where: tuple[DeployTarget, EnvironmentSpec, Mapping[str, ServiceSpec]],
    state: EnvironmentState,
    flow_run_id: str,
) -> EnvironmentState | None:
    """Undo a promotion's record that landed after its run rolled back; None if none did.

    The run gave up on its record (the store timed out), put every service back, and
    could not clear its intent either (the store still failing); then the store finished
    the record, which cleared the intent. The ledger names a release that does not serve,
    and no intent is left to find: what serves tells. A record none of whose services
    serves what it names, each serving what the intent found before, is undone.
    """
    deploy_target, env, services = where
    before = Ledger(store).revision(env.name, state.revision - 1)
    writer = _late_writer(state, before)
    if writer is None or before is None or before.in_progress is None:
        return None
    deployer = deploy_target.deployer()
    for name, record in state.services.items():
        if record.flow_run_id != writer:
            continue
        if name not in services:
            return None
        live = deployer.live(env, services[name])
        was = before.in_progress.previous.get(name)
        serving = live.image.digest if live else None
        if serving == record.image.digest or serving != (was.image.digest if was else None):
            return None
    change = (
        f"run {writer}'s record of release {before.in_progress.release_id} landed after the "
        f"run had rolled it back; run {flow_run_id} found the previous releases serving"
    )
    run_logger().warning("%s: %s", env.name, change)
    return end_deploys.fn(store, env.name, writer, change)


@task(cache_policy=NO_CACHE)
def recover_interrupted(
    store: WritableFileSystem,
    deploy_target: DeployTarget,
    env: EnvironmentSpec,
    services: Mapping[str, ServiceSpec],
    flow_run_id: str,
) -> EnvironmentState | None:
    """Undo the deploys of a promotion that died mid-way; None when there is nothing to undo.

    Call it holding `deploy-<env>`: the ledger's intent then belongs to a run whose lock
    lease expired, so a dead run (a live holder renews its lease, or stops on failing to).
    The environment goes back to what served before that run, as its intent recorded,
    which is what the ledger still names (the promotion was never recorded); the dead
    run is marked Crashed.

    Raises:
        PromotionError: a service could not be put back; the intent stays for the next run.
    """
    state = read_ledger.fn(store, env.name)
    pending = state.in_progress
    if pending is None:
        return _undo_late_record(store, (deploy_target, env, services), state, flow_run_id)
    if pending.flow_run_id == flow_run_id:
        return None
    logger = run_logger()
    logger.warning(
        "run %s died while deploying release %s into %s (since %s): rolling its deploys back",
        pending.flow_run_id,
        pending.release_id,
        env.name,
        f"{pending.started_at:%H:%M:%S %Z}",
    )
    deployer = deploy_target.deployer()
    specs = []
    for name, before in sorted(pending.previous.items()):
        if name not in services:
            msg = f"the interrupted release {pending.release_id} names unknown service {name}"
            raise PromotionError(msg)
        spec = services[name]
        specs.append(spec)
        live = deployer.live(env, spec)
        wanted = before.image.digest if before else None
        if (live.image.digest if live else None) != wanted:
            deployer.restore(env, spec, before)
    restored = confirm_restored.fn(deploy_target, env, specs, pending.previous)
    change = (
        f"run {pending.flow_run_id} died deploying release {pending.release_id}; "
        f"run {flow_run_id} put the previous releases back"
    )
    state = end_deploys.fn(store, env.name, pending.flow_run_id, change)
    mark_crashed(pending.flow_run_id, f"died while deploying; {change}")
    logger.warning("%s: %s", env.name, rollback_message(PromotionError(change), restored))
    return state

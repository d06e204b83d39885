"""What a worker may run: a flow run's deployment against `prefect.yaml` on the protected branch.

Anyone who reaches the Prefect API can rewrite a deployment (its entrypoint, pull steps,
job variables, default parameters, work pool), create one, or start a run with job
variables and parameters of their choosing. A worker therefore checks each run before it
starts it, against what the protected branch of its pinned repository declares, as
committed:

- the deployment of that name exists in `prefect.yaml`;
- entrypoint, pull steps (the deployment's own `pull`, else the file's top-level one),
  job variables, default parameters, work pool and queue are exactly the declared ones;
- the run brings no job variables of its own;
- the run's parameters are among the flow's, as its function on the protected branch
  declares them; those that only serve local development (`LOCAL_ONLY`: a checkout to use
  in place, a configuration file, extra container variables) may only be None (their
  default, which a fan-out passes along).

A worker also deploys only into the environments its trust file names (`TrustRoots.
environments`: the credentials it holds): `environment_difference` refuses a run whose
effective `environment` (the run's parameter, else the deployment's default, else the
flow's own default on the protected branch) is another one, and `require_trusted_environment`
is the same check made again by a promotion, rollback or health check at its start.

`differences` and `environment_difference` compare (pure); `declared_deployment` reads the
protected branch.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from blocks.environments import SEED_ALIASES
from blocks.repository import trusted_repository
from core.errors import ConfigError
from core.settings import Settings
from core.trust import TrustRoots, load_trust_roots
from tasks.workspace import read_protected_file

LOCAL_ONLY: frozenset[str] = frozenset({"repo", "config_source", "drill_env"})
"""Flow parameters that only serve local development (`cicd ... --repo/--config`, rollback
drills): each points the run at files or code the protected branch did not review, so a
worker refuses a run that carries one."""


@dataclass(frozen=True)
class DeploymentFacts:
    """What decides what a deployment run executes, as declared or as the API holds it."""

    name: str
    entrypoint: str
    pull_steps: list[dict[str, Any]]
    job_variables: dict[str, Any]
    parameters: dict[str, Any]
    work_pool: str
    work_queue: str


@dataclass(frozen=True)
class Declared:
    """A deployment of `prefect.yaml` on the protected branch, the parameters its flow takes
    and their defaults (those written as literals)."""

    facts: DeploymentFacts
    allowed_parameters: frozenset[str] = field(default_factory=frozenset)
    defaults: Mapping[str, Any] = field(default_factory=dict)


def _json(value: object) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def differences(
    declared: Declared,
    actual: DeploymentFacts,
    run_parameters: Mapping[str, Any],
    run_job_variables: Mapping[str, Any] | None,
    worker_pool: str,
) -> list[str]:
    """Each way a run differs from what the protected branch declares, one short line each.

    Empty: the run may start.
    """
    want = declared.facts
    found: list[str] = []
    for what, mine, theirs in (
        ("entrypoint", actual.entrypoint, want.entrypoint),
        ("pull steps", actual.pull_steps, want.pull_steps),
        ("job variables", actual.job_variables, want.job_variables),
        ("default parameters", actual.parameters, want.parameters),
        ("work pool", actual.work_pool, want.work_pool),
        ("work queue", actual.work_queue, want.work_queue),
    ):
        if _json(mine) != _json(theirs):
            found.append(
                f"{what} {_short(mine)} differs from the protected branch's {_short(theirs)}"
            )
    if actual.work_pool != worker_pool:
        found.append(f"work pool {actual.work_pool!r} is not this worker's ({worker_pool!r})")
    if run_job_variables:
        found.append(f"the run sets job variables {sorted(run_job_variables)}")
    # None is each one's default ("not given"): a caller passing it along asks for nothing
    local = sorted(k for k in LOCAL_ONLY if run_parameters.get(k) is not None)
    if local:
        found.append(f"parameters {local} serve local development only")
    unknown = sorted(set(run_parameters) - declared.allowed_parameters - LOCAL_ONLY)
    if unknown:
        found.append(f"parameters {unknown} are not the flow's")
    return found


ENVIRONMENT = "environment"
"""The flow parameter naming where a run deploys (or, for a health check, what it reads)."""


def may_deploy_into(roots: TrustRoots, environment: str) -> bool:
    """Whether a worker trusting `roots` may act on `environment`, a name or a seed alias
    (`prod` stands for production, `stg` for staging, as the flows resolve them)."""
    return roots.may_deploy(environment) or roots.may_deploy(
        SEED_ALIASES.get(environment, environment)
    )


def _not_trusted(roots: TrustRoots, environment: str) -> str:
    return (
        f"environment {environment!r} is not one this worker deploys into"
        f" ({', '.join(roots.environments)})"
    )


def environment_difference(
    declared: Declared, run_parameters: Mapping[str, Any], roots: TrustRoots
) -> str | None:
    """Why a run may not act on its environment on a worker trusting `roots`; None: it may.

    The effective environment is the run's `environment` parameter, else the deployment's
    default (the protected branch's), else the flow's own default; a flow without an
    `environment` parameter acts on none.
    """
    if ENVIRONMENT not in declared.allowed_parameters:
        return None
    for source in (run_parameters, declared.facts.parameters, declared.defaults):
        if ENVIRONMENT in source:
            environment = source[ENVIRONMENT]
            break
    else:
        return "the run names no environment"
    if not isinstance(environment, str):
        return f"environment {_short(environment)} is not an environment's name"
    return None if may_deploy_into(roots, environment) else _not_trusted(roots, environment)


SET_WORKING_DIRECTORY = "prefect.deployments.steps.set_working_directory"
_ENV_TEMPLATE = re.compile(r"^\{\{\s*\$([A-Za-z_][A-Za-z0-9_]*)\s*\}\}$")


@dataclass(frozen=True)
class Launch:
    """How a worker starts a run it verified, so the run reads nothing the API could have
    rewritten since: its working directory, and its entrypoint as an absolute path."""

    directory: Path
    entrypoint: str


def launch_of(declared: Declared, environ: Mapping[str, str]) -> Launch | None:
    """The launch of a run of `declared`, its pull steps done by the worker itself; None
    when they are anything but one working directory (a literal or `{{ $VAR }}` of
    `environ`) that exists."""
    steps = declared.facts.pull_steps
    if len(steps) != 1 or set(steps[0]) != {SET_WORKING_DIRECTORY}:
        return None
    directory = str((steps[0][SET_WORKING_DIRECTORY] or {}).get("directory", ""))
    variable = _ENV_TEMPLATE.match(directory)
    if variable is not None:
        directory = environ.get(variable.group(1), "")
    if not directory or "{{" in directory or not Path(directory).is_dir():
        return None
    path, _, function = declared.facts.entrypoint.partition(":")
    where = Path(directory).resolve()
    return Launch(directory=where, entrypoint=f"{where / path}:{function}")


def refuse_local_only(settings: Settings, parameters: Mapping[str, Any]) -> None:
    """Refuse, at a flow's start on a worker, parameters that serve local development.

    The worker refused them before it started the run; a run's parameters can still be
    rewritten through the API between that check and the run's start, so the flow looks
    again. No-op on a person's machine: no trust file, or one that leaves the configuration
    to the host (`config: null`, which a worker refuses to start with).

    Raises:
        ConfigError: a worker's trust file is set and one of `LOCAL_ONLY` is given.
    """
    given = sorted(k for k in LOCAL_ONLY if parameters.get(k) is not None)
    if not given:
        return
    roots = settings.trust_roots()
    if roots is not None and roots.config is not None:
        msg = f"parameters {given} serve local development only; a worker's run takes none"
        raise ConfigError(msg)


def require_trusted_environment(settings: Settings, environment: str) -> None:
    """Refuse, at a flow's start, an environment the worker that started it may not act on.

    Only a run started by a trusted worker has a trust file (`settings.trust_file`); the
    worker already refused such a run, so this matters only when a worker is misconfigured.

    Raises:
        ConfigError: the trust file does not name `environment`, or cannot be read.
    """
    if settings.trust_file is None:
        return
    roots = load_trust_roots(settings.trust_file)
    if not may_deploy_into(roots, environment):
        msg = f"{_not_trusted(roots, environment)} (trust file {settings.trust_file})"
        raise ConfigError(msg)


def _short(value: object, limit: int = 120) -> str:
    text = _json(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def flow_signature(source: str, function: str) -> tuple[frozenset[str], dict[str, Any]]:
    """The parameter names of `function` defined at the top of `source` (read, not
    imported), and the defaults among them written as literals.

    Raises:
        ConfigError: `source` defines no such function.
    """
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == function:
            args = node.args
            positional = [*args.posonlyargs, *args.args]
            with_default = positional[len(positional) - len(args.defaults) :]
            pairs = [
                *zip(with_default, args.defaults, strict=True),
                *zip(args.kwonlyargs, args.kw_defaults, strict=True),
            ]
            defaults: dict[str, Any] = {}
            for arg, default in pairs:
                if default is not None:
                    try:
                        defaults[arg.arg] = ast.literal_eval(default)
                    except (ValueError, TypeError, SyntaxError):
                        continue  # not a literal: not known without running the code
            names = frozenset(a.arg for a in (*positional, *args.kwonlyargs))
            return names, defaults
    msg = f"no function {function!r} at the top of the entrypoint's file"
    raise ConfigError(msg)


def declared_deployments(prefect_yaml: str, read_file: Callable[[str], str]) -> dict[str, Declared]:
    """The deployments `prefect_yaml` declares, by name; `read_file` reads an entrypoint's file.

    A deployment whose entrypoint cannot be read is left out (no run of it may start).

    Raises:
        ConfigError: the file is not a prefect.yaml with a list of deployments.
    """
    try:
        data = yaml.safe_load(prefect_yaml)
    except yaml.YAMLError as exc:
        msg = f"prefect.yaml is not YAML: {exc}"
        raise ConfigError(msg) from exc
    if not isinstance(data, dict) or not isinstance(data.get("deployments"), list):
        msg = "prefect.yaml: deployments: expected a list"
        raise ConfigError(msg)
    pull = data.get("pull") or []
    sources: dict[str, str | None] = {}
    declared: dict[str, Declared] = {}
    for raw in data["deployments"]:
        if not isinstance(raw, dict) or not raw.get("name") or not raw.get("entrypoint"):
            continue
        pool = raw.get("work_pool") or {}
        entrypoint = str(raw["entrypoint"])
        path, _, function = entrypoint.partition(":")
        if path not in sources:
            try:
                sources[path] = read_file(path)
            except ConfigError:
                sources[path] = None
        source = sources[path]
        if source is None:
            continue
        try:
            allowed, defaults = flow_signature(source, function)
        except (ConfigError, SyntaxError):
            continue
        facts = DeploymentFacts(
            name=str(raw["name"]),
            entrypoint=entrypoint,
            pull_steps=list(raw.get("pull", pull) or []),
            job_variables=dict(pool.get("job_variables") or {}),
            parameters=dict(raw.get("parameters") or {}),
            work_pool=str(pool.get("name") or ""),
            work_queue=str(pool.get("work_queue_name") or "default"),
        )
        declared[facts.name] = Declared(facts, allowed - LOCAL_ONLY, defaults)
    return declared


def declared_deployment(roots: TrustRoots, name: str) -> Declared:
    """The deployment `name` as `prefect.yaml` declares it on the protected branch, fetched now.

    Raises:
        ConfigError: the protected branch declares no deployment `name`.
        ToolError: the repository cannot be reached.
    """
    repository = trusted_repository(roots)
    text = read_protected_file(repository, "prefect.yaml")
    found = declared_deployments(text, lambda path: read_protected_file(repository, path))
    if name not in found:
        msg = f"deployment {name!r} is not declared in prefect.yaml on {roots.protected_branch}"
        raise ConfigError(msg)
    return found[name]

"""The approval policy: which environments wait for whom, how many, for how long.

It lives in `config/approvals.yaml` and is read from the protected branch of the
repository (`tasks.workspace.read_protected_file`), never from a flow parameter, the
working tree or a file the caller names: changing it takes a reviewed commit to that
branch. Whatever the file says, production waits for at least one approval
(`PAGED_BY_NAME`): the invariant is code, not configuration.

Identities are SSH keys: `allowed_signers` is an OpenSSH allowed-signers text whose
principals are the approvers' (and promoters') names; `slack_users` maps a Slack user
id to one of those names for the Slack buttons.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from blocks.environments import PAGED_BY_NAME
from core.analysis import AnalysisPolicy
from core.errors import ConfigError
from core.windows import DeployWindows

POLICY_FILE = "config/approvals.yaml"


class EnvironmentPolicy(BaseModel):
    """The gate of one environment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    approvers: tuple[str, ...] = Field(min_length=1, description="Who may approve (principals)")
    approvals_required: int = Field(default=1, ge=1, description="Distinct approvers needed")
    timeout_s: int = Field(default=3600, ge=1, description="How long the gate waits")

    @model_validator(mode="after")
    def _enough_approvers(self) -> EnvironmentPolicy:
        if len(set(self.approvers)) < self.approvals_required:
            msg = (
                f"approvals_required is {self.approvals_required} but only "
                f"{len(set(self.approvers))} approvers are named"
            )
            raise ValueError(msg)
        return self


class ApprovalPolicy(BaseModel):
    """Every gated environment's policy and the keys that prove identities."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    environments: dict[str, EnvironmentPolicy] = Field(default_factory=dict)
    allowed_signers: str = Field(
        default="", description="OpenSSH allowed-signers text; principals are people's names"
    )
    slack_users: dict[str, str] = Field(
        default_factory=dict, description="Slack user id -> principal, for the Slack buttons"
    )
    automation_signers: tuple[str, ...] = Field(
        default=(),
        description=(
            "Principals that sign for a workflow (GitHub Actions): their requests name "
            "the person who triggered it (`github_users` maps that login to a principal)"
        ),
    )
    github_users: dict[str, str] = Field(
        default_factory=dict, description="GitHub login -> principal"
    )
    deploy_windows: dict[str, DeployWindows] = Field(
        default_factory=dict,
        description="Environment -> its freezes (core/windows.py); none: always open",
    )
    analysis: dict[str, AnalysisPolicy] = Field(
        default_factory=dict,
        description="Environment -> its post-deploy analysis (core/analysis.py); none: no analysis",
    )

    def gate(self, environment: str) -> EnvironmentPolicy | None:
        """The gate of `environment`; None when it deploys without approval.

        Raises:
            ConfigError: a production environment has no gate in the policy.
        """
        policy = self.environments.get(environment)
        if policy is None and environment in PAGED_BY_NAME:
            msg = (
                f"{environment} always waits for an approval, but {POLICY_FILE} on the "
                "protected branch names no approvers for it"
            )
            raise ConfigError(msg)
        return policy

    def override_approvers(self, environment: str) -> tuple[str, ...]:
        """Who may sign an override of `environment`'s freeze: its windows' own list, else
        its gate's approvers; none when neither names anyone."""
        windows = self.deploy_windows.get(environment)
        if windows is not None and windows.override_approvers:
            return windows.override_approvers
        gate = self.environments.get(environment)
        return gate.approvers if gate is not None else ()


def parse_policy(text: str, where: str = POLICY_FILE) -> ApprovalPolicy:
    """The policy in `text` (YAML).

    Raises:
        ConfigError: not YAML, or not a valid policy (names what is wrong).
    """
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        msg = f"{where}: not valid YAML: {exc}"
        raise ConfigError(msg) from exc
    try:
        return ApprovalPolicy.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors()
        )
        msg = f"{where}: {problems}"
        raise ConfigError(msg) from None  # the errors are all listed; no input echoed


def policy_from_file(path: Path) -> ApprovalPolicy:
    """A policy file read from disk (for `cicd` commands that show it, never for a gate)."""
    return parse_policy(path.read_text(encoding="utf-8"), str(path))

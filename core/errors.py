"""Every error the pipeline raises on purpose, in one hierarchy.

PipelineError
├── ConfigError              configuration invalid, or names something unknown
├── SourceError              the repository, or a ref in it, cannot be read
│   └── UnreviewedCommit     a commit is not on the protected branch (after a fresh fetch)
├── ToolError                a tool or daemon could not run (network, engine down): retryable
│   ├── StackError           a part of the local stack could not be installed or started
│   └── Unavailable          what a daemon needs to answer cannot be had now (503: retry)
├── StageFailed              a check ran and said no (lint error, failing test): never retried
│   └── CheckFailed          ...with the tool's output attached
├── CiFailed                 a CI run ended with failed services; carries the run's outcome
├── ImageError               build, push or digest verification failed
│   └── RegistryError        a registry (OCI or ECR) refused, or does not hold, an image
├── DeployError              a deploy did not become healthy; the previous release still serves
│   ├── ManifestError        the Kubernetes manifests do not render or validate
│   ├── KubernetesApiError   the Kubernetes API refused a call (HTTP status kept)
│   ├── RolloutFailed        a rollout failed or missed its deadline (before any restore)
│   └── DeployLockLost       the deploy lock's lease was lost: stop at a safe point, put back
├── HealthCheckFailed        a health check failed; names the endpoint and what it answered
│   └── EnvironmentUnhealthy  nothing deployed, or services unhealthy; carries the report
├── LedgerError              the release ledger cannot be read or written
│   ├── LedgerUnavailable    its store did not answer (refused, timeout, 5xx): retryable
│   └── LedgerConflict       another writer created the same revision first
├── BackupError              an environment backup cannot be written or read
├── NoticeUndeliverable      Slack or PagerDuty refused a notice
├── PromotionError           a promotion did not complete
│   ├── PromotionRefused     refused before anything changed (unknown, unverified, unsafe)
│   ├── PromotionRejected    an approver said no, or nobody answered in time
│   ├── PromotionRolledBack  deployed, failed verification, every service put back
│   ├── PerformanceRegression  the new release is slower or fails more than the previous one
│   └── AnalysisFailed   the post-deploy metric analysis failed a check
│       └── AnalysisInconclusive  it could not judge (no data, Prometheus unreachable)
└── ApprovalError            answering a paused promotion did not work
    ├── GateError            the run cannot be answered (unknown, not paused, no form)
    │   └── PauseInterrupted  a waiting run was cancelled or ended from outside
    ├── ApprovalRefused      the Prefect server refused the answer; the run stays paused
    ├── AnswerRefused        the gate refused an answer (no valid signature, not an
    │                        approver, self-approval, another promotion's statement)
    ├── SigningError         ssh-keygen could not sign or check (missing, no key, timeout)
    ├── SignatureRefused     the signature does not prove this statement by its signer
    └── SlackRequestRefused  a Slack request that must change nothing (HTTP 400)
        ├── SlackSignatureInvalid  not signed by Slack, stale, or a replay  (HTTP 401)
        ├── SlackPayloadInvalid    not an approval button press of ours      (HTTP 400)
        └── SlackUserUnknown       the Slack user is no configured approver  (HTTP 403)

None derives from ValueError or KeyError, so nobody catches one by accident. Errors
that carry data rebuild themselves in `__reduce__`: Prefect pickles a failed run's
exception as its result.

This is the bottom layer: it imports nothing of the project but `core.records` (the
payloads), and every layer (blocks included) raises from it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from core.records import CiOutcome, HealthReport, PromotionPlan


class PipelineError(Exception):
    """Base of every error the pipeline raises on purpose."""


class ConfigError(PipelineError):
    """The configuration is invalid; the message names the source, the field and the problem."""


class SourceError(PipelineError):
    """The repository cannot be read, or a ref is not a commit in it."""


class UnreviewedCommit(SourceError):
    """A commit the protected branch does not reach, as a fresh fetch of the pinned
    repository sees it: it may neither ship nor be promoted. The message names the full
    SHA, the branch and the repository."""


class ToolError(PipelineError):
    """A tool or daemon could not run at all; worth a retry."""


class StackError(ToolError):
    """A part of the local stack could not be installed or started."""


class Unavailable(ToolError):
    """What a daemon (the Slack receiver) needs to judge a request cannot be had right now:
    it answers 503, and the sender retries."""


class StageFailed(PipelineError):
    """A check ran and failed; retrying cannot help."""

    def __init__(self, service: str, stage: str, summary: str, excerpt: str = "") -> None:
        self.service = service
        self.stage = stage
        self.summary = summary
        self.excerpt = excerpt
        super().__init__(f"{service}: {stage} failed: {summary}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.service, self.stage, self.summary, self.excerpt))


class CheckFailed(StageFailed):
    """A stage failed, with its run time and details for the report."""

    def __init__(
        self,
        service: str,
        stage: str,
        summary: str,
        excerpt: str = "",
        seconds: float = 0.0,
        details: dict[str, str | int | float | bool | None] | None = None,
    ) -> None:
        super().__init__(service, stage, summary, excerpt)
        self.seconds = seconds
        self.details: dict[str, str | int | float | bool | None] = dict(details or {})

    def __reduce__(self) -> tuple[Any, ...]:
        args = (self.service, self.stage, self.summary, self.excerpt, self.seconds, self.details)
        return (type(self), args)


class CiFailed(PipelineError):
    """A CI run checked its services and some failed; `outcome` is everything it found.

    The message is one line, "CI failed for N of M services: service: stage failed:
    summary; ...". The `ci` flow ends Failed with it as its state's data: the flow
    engine hands a failed state's exception back to whoever reads its result.
    """

    def __init__(self, message: str, outcome: CiOutcome) -> None:
        self.outcome = outcome
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.outcome))


class ImageError(PipelineError):
    """An image could not be built, pushed or verified."""


class RegistryError(ImageError):
    """A registry refused an operation, or does not hold the image it should."""


class DeployError(PipelineError):
    """A deploy failed; the previous release keeps serving."""


class ManifestError(DeployError):
    """The manifests do not render, or do not validate against the Kubernetes schemas."""


class KubernetesApiError(DeployError):
    """The Kubernetes API refused a call; `status` is its HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.status))


class RolloutFailed(DeployError):
    """A rollout failed or missed its deadline; the deployer restores the previous release."""


class DeployLockLost(DeployError):
    """The deploy lock's lease was lost (revoked, expired, or not renewable in time):
    the deploy stops at its next safe point and puts back what it changed."""


class HealthCheckFailed(PipelineError):
    """A service answered its health check wrongly or not at all."""


class EnvironmentUnhealthy(HealthCheckFailed):
    """An environment's health check failed; `report` is its health report."""

    def __init__(self, message: str, report: HealthReport | None = None) -> None:
        self.report = report
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.report))


class LedgerError(PipelineError):
    """The ledger cannot be read or written."""


class LedgerUnavailable(LedgerError):
    """The ledger's store did not answer (unreachable, reset, timed out, 5xx, throttled):
    worth a retry, unlike a refusal (403) or a full or read-only disk."""


class LedgerConflict(LedgerError):
    """Another writer created the same ledger revision first."""


class BackupError(PipelineError):
    """A backup cannot be written or read."""


class NoticeUndeliverable(PipelineError):
    """A notice could not be delivered; `transient` says whether a retry may help."""

    def __init__(self, message: str, *, transient: bool) -> None:
        self.transient = transient
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_undeliverable, (str(self), self.transient))


class PromotionError(PipelineError):
    """A promotion did not complete."""


class PromotionRefused(PromotionError):
    """The promotion was refused before anything changed."""


class PromotionRejected(PromotionError):
    """An approver rejected the promotion, or nobody approved it in time; nothing deployed.

    `plan` is the promotion plan when one was made.
    """

    def __init__(self, message: str, *, plan: PromotionPlan | None = None) -> None:
        self.plan = plan
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_rejected, (str(self), self.plan))


class PromotionRolledBack(PromotionError):
    """The release was deployed, failed verification, and every service was put back."""

    def __init__(
        self,
        message: str,
        *,
        failed: str,
        restored: dict[str, str | None],
        plan: PromotionPlan | None = None,
    ) -> None:
        self.failed = failed
        self.restored = restored
        self.plan = plan
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_rolled_back, (str(self), self.failed, self.restored, self.plan))


class PerformanceRegression(PromotionError):
    """The new release is slower or fails more than the previous one allowed."""

    def __init__(self, service: str, problems: list[str]) -> None:
        self.service = service
        self.problems = problems
        super().__init__(f"{service}: performance regression: {'; '.join(problems)}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.service, self.problems))


class ApprovalError(PipelineError):
    """Answering a paused promotion did not work."""


class GateError(ApprovalError):
    """The run cannot be answered: unknown, not paused, or not waiting for an approval."""


class PauseInterrupted(GateError):
    """A waiting run was cancelled or set to a final state from outside; nothing answered."""

    def __init__(self, state: str) -> None:
        super().__init__(f"the waiting run was set to {state} from outside")
        self.state = state

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.state,))


class ApprovalRefused(ApprovalError):
    """The Prefect server refused the answer; the run stays paused."""


class AnswerRefused(ApprovalError):
    """The gate refused an answer; the run waits on. `claimed` is who it claimed to be."""

    def __init__(self, message: str, claimed: str = "unknown") -> None:
        self.claimed = claimed
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.claimed))


class SigningError(ApprovalError):
    """A statement could not be signed, or a signature could not be checked at all."""


class SignatureRefused(ApprovalError):
    """The signature does not prove this statement, by this signer, for this namespace."""


class SlackRequestRefused(ApprovalError):
    """A request to the Slack receiver that must change nothing; `status` is its HTTP answer."""

    status: ClassVar[int] = 400


class SlackSignatureInvalid(SlackRequestRefused):
    """Not signed with the app's signing secret, too old or new, or seen before."""

    status: ClassVar[int] = 401


class SlackPayloadInvalid(SlackRequestRefused):
    """The body is not a press of one of the approval buttons."""

    status: ClassVar[int] = 400


class SlackUserUnknown(SlackRequestRefused):
    """The Slack user who pressed the button is not mapped to an approver."""

    status: ClassVar[int] = 403


def _rebuild_undeliverable(message: str, transient: bool) -> NoticeUndeliverable:
    return NoticeUndeliverable(message, transient=transient)


def _rebuild_rejected(message: str, plan: PromotionPlan | None) -> PromotionRejected:
    return PromotionRejected(message, plan=plan)


def _rebuild_rolled_back(
    message: str, failed: str, restored: dict[str, str | None], plan: PromotionPlan | None
) -> PromotionRolledBack:
    return PromotionRolledBack(message, failed=failed, restored=restored, plan=plan)


class AnalysisFailed(PromotionError):
    """The post-deploy metric analysis failed: the message names each failed check's
    query, its measured values and its limit."""


class AnalysisInconclusive(AnalysisFailed):
    """The analysis could not judge the release (no data, Prometheus unreachable): never a
    pass; the environment's policy fails the release."""

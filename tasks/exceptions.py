"""Errors of the pipeline's tasks.

PipelineError
├── ToolError            a tool or daemon could not run (network, engine down): retryable
├── StageFailed          a tool ran and said no (lint error, failing test): never retried
├── ImageError           build, push or digest verification failed
├── DeployError          a deploy did not become healthy; the previous release still serves
├── HealthCheckFailed    a health check failed; names the endpoint and what it answered
└── PromotionError       a promotion was refused, rejected or rolled back
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base of every error the pipeline raises on purpose."""


class ToolError(PipelineError):
    """A tool or daemon could not run at all; worth a retry."""


class StageFailed(PipelineError):
    """A check ran and failed; retrying cannot help."""

    def __init__(self, service: str, stage: str, summary: str, excerpt: str = "") -> None:
        self.service = service
        self.stage = stage
        self.summary = summary
        self.excerpt = excerpt
        super().__init__(f"{service}: {stage} failed: {summary}")


class ImageError(PipelineError):
    """An image could not be built, pushed or verified."""


class DeployError(PipelineError):
    """A deploy failed; the previous release keeps serving."""


class HealthCheckFailed(PipelineError):
    """A service answered its health check wrongly or not at all."""


class PromotionError(PipelineError):
    """A promotion did not complete."""

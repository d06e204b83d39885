"""The `kubernetes` deploy target: which cluster, and how patiently to talk to it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from prefect.blocks.core import Block
from prefect_kubernetes.credentials import KubernetesCredentials
from pydantic import Field, SecretStr, field_validator

from core.errors import ConfigError

API_RETRY_BUDGET_S = 120.0
"""How long an API call is retried by default: longer than an API server restart (about a
minute)."""


def _kubeconfig_document(text: str) -> dict[str, Any]:
    """The kubeconfig as a mapping; errors name the problem, never the content."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        msg = f"the kubeconfig is not valid YAML{where}"
        raise ValueError(msg) from None
    if not isinstance(document, dict) or not document.get("clusters"):
        msg = "the kubeconfig names no clusters (is it a kubeconfig?)"
        raise ValueError(msg)
    return document


class KubernetesTarget(Block):
    """A Kubernetes cluster the pipeline deploys to, through its API server."""

    _block_type_name = "Elice Kubernetes Target"
    _description = (
        "Server-side applies each environment's rendered overlay and waits for the rollout."
    )

    kubeconfig: SecretStr | None = Field(
        default=None,
        description=(
            "A kubeconfig (YAML), kept secret: it holds client keys or tokens. An exec "
            "plugin (`aws eks get-token`) runs on the worker. None: `credentials`, else "
            "the in-cluster service account, else ~/.kube/config"
        ),
    )
    context: str | None = Field(
        default=None, description="The kubeconfig context to use (None: its current-context)"
    )
    credentials: KubernetesCredentials | None = Field(
        default=None,
        description=(
            "prefect-kubernetes credentials holding a kubeconfig and context (stored "
            "unmasked: prefer `kubeconfig`)"
        ),
    )
    health_via: Literal["auto", "dns", "proxy"] = Field(
        default="auto",
        description=(
            "How health checks reach services: dns (the worker runs in the cluster), "
            "proxy (the API server's service proxy, from outside), or auto (dns when "
            "KUBERNETES_SERVICE_HOST says the worker runs in a pod)"
        ),
    )
    deployments_dir: str | None = Field(
        default=None,
        description="The kustomize tree (base, components, overlays); None: <repo>/deployments",
    )
    poll_interval_s: float = Field(
        default=2.0, gt=0, le=60, description="Seconds between rollout status reads"
    )
    rollout_deadline_s: float = Field(
        default=600.0,
        gt=0,
        le=7200,
        description=(
            "How long a rollout (a deploy's or a restore's) may take before it fails; the "
            "controller's ProgressDeadlineExceeded (the manifests' progressDeadlineSeconds) "
            "ends a failing one sooner"
        ),
    )
    request_timeout_s: float = Field(
        default=30.0, gt=0, le=600, description="Timeout of one API request"
    )
    retries: int = Field(
        default=4,
        ge=0,
        le=20,
        description="Retries of a request answered 5xx, 409, 429 or timed out",
    )
    retry_backoff_s: float = Field(
        default=0.5, ge=0, le=60, description="First retry delay; doubles on each further retry"
    )
    retry_backoff_max_s: float = Field(
        default=8.0, ge=0, le=300, description="Upper bound of one retry delay"
    )
    api_retry_budget_s: float = Field(
        default=API_RETRY_BUDGET_S,
        ge=0,
        le=3600,
        description=(
            "How long a request answered 5xx, 409, 429, timed out or not answered is "
            "retried (with `retries`: both are spent before it fails)"
        ),
    )

    @field_validator("kubeconfig")
    @classmethod
    def _parses(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _kubeconfig_document(value.get_secret_value())
        return value

    @classmethod
    def from_kubeconfig(cls, path: Path, context: str | None = None) -> KubernetesTarget:
        """A target for the cluster of the kubeconfig at `path` (its `context`).

        Raises:
            ConfigError: the file cannot be read, is no kubeconfig, or has no such context.
        """
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            msg = f"{path}: cannot read the kubeconfig: {exc.strerror}"
            raise ConfigError(msg) from exc
        try:
            document = _kubeconfig_document(text)
        except ValueError as exc:
            msg = f"{path}: {exc}"
            raise ConfigError(msg) from None
        names = [c.get("name") for c in document.get("contexts") or [] if isinstance(c, dict)]
        chosen = context or document.get("current-context")
        if chosen not in names:
            msg = f"{path}: no context {chosen!r}; it has {', '.join(map(str, names)) or 'none'}"
            raise ConfigError(msg)
        return cls(kubeconfig=SecretStr(text), context=chosen)

    def identity(self) -> str:
        """What tells this cluster and its credentials apart (secret: hash it, never log)."""
        if self.kubeconfig is not None:
            return f"kubeconfig\n{self.context}\n{self.kubeconfig.get_secret_value()}"
        if self.credentials is not None and self.credentials.cluster_config is not None:
            cluster = self.credentials.cluster_config
            return f"credentials\n{cluster.context_name}\n{cluster.config}"
        return "in-cluster or ~/.kube/config"

    def api_client(self) -> Any:
        """A `kubernetes.client.ApiClient` for this cluster (official synchronous client)."""
        from kubernetes import client, config  # noqa: PLC0415 - heavy import, only when used

        cluster = self.credentials.cluster_config if self.credentials else None
        configuration = client.Configuration()
        if self.kubeconfig is not None:
            config.load_kube_config_from_dict(  # type: ignore[no-untyped-call]
                config_dict=_kubeconfig_document(self.kubeconfig.get_secret_value()),
                context=self.context,
                client_configuration=configuration,
                persist_config=False,
            )
        elif cluster is not None:
            config.load_kube_config_from_dict(  # type: ignore[no-untyped-call]
                config_dict=cluster.config,
                context=cluster.context_name,
                client_configuration=configuration,
                persist_config=False,
            )
        else:
            try:
                config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            except config.ConfigException:
                config.load_kube_config(  # type: ignore[no-untyped-call]
                    client_configuration=configuration, persist_config=False
                )
        # The deployer retries with backoff itself; no hidden urllib3 retries underneath.
        configuration.retries = 0
        return client.ApiClient(configuration)

"""The `kubernetes` deploy target: which cluster, and how patiently to talk to it."""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block
from prefect_kubernetes.credentials import KubernetesCredentials
from pydantic import Field


class KubernetesTarget(Block):
    """A Kubernetes cluster the pipeline deploys to, through its API server."""

    _block_type_name = "Elice Kubernetes Target"
    _description = (
        "Server-side applies each environment's rendered overlay and waits for the rollout."
    )

    credentials: KubernetesCredentials | None = Field(
        default=None,
        description=(
            "prefect-kubernetes credentials holding a kubeconfig and context; "
            "None: the in-cluster service account, else ~/.kube/config"
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
        default=600.0, gt=0, le=7200, description="How long a restore may take to roll out"
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

    def api_client(self) -> Any:
        """A `kubernetes.client.ApiClient` for this cluster (official synchronous client)."""
        from kubernetes import client, config  # noqa: PLC0415 - heavy import, only when used

        cluster = self.credentials.cluster_config if self.credentials else None
        configuration = client.Configuration()
        if cluster is not None:
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

"""Deployment environments as a Prefect block: dev, staging, production.

The schema is `core.catalog`'s plain models (read commands load them without Prefect);
this block is the same data saved on a server.
"""

from __future__ import annotations

from prefect.blocks.core import Block

from core.catalog import (
    PAGED_BY_NAME,
    SEED_ALIASES,
    Environments,
    EnvironmentSpec,
    RegistryChoice,
    Replicas,
    TargetKind,
)

__all__ = [
    "PAGED_BY_NAME",
    "SEED_ALIASES",
    "EnvironmentCatalog",
    "EnvironmentSpec",
    "RegistryChoice",
    "Replicas",
    "TargetKind",
]


class EnvironmentCatalog(Environments, Block):
    """The ordered environments of the promotion path."""

    _block_type_name = "Elice Environments"
    _description = "dev -> staging -> production: namespaces, replicas, log levels, approvers."

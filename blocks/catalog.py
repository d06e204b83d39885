"""The service catalog as a Prefect block: which services and libs the monorepo holds.

The schema is `core.catalog`'s plain models (read commands load them without Prefect);
this block is the same data saved on a server.
"""

from __future__ import annotations

from prefect.blocks.core import Block

from core.catalog import Catalog, LibSpec, Name, ServiceSpec, find_named

__all__ = ["LibSpec", "Name", "ServiceCatalog", "ServiceSpec", "find_named"]


class ServiceCatalog(Catalog, Block):
    """The typed catalog of the monorepo's services and shared libraries."""

    _block_type_name = "Elice Service Catalog"
    _description = "The services of the monorepo: ports, health paths, lib dependencies."

"""The work pools the reconciler creates, by name: constants without Prefect.

`cicd stack status` shows each stack worker's pool without importing the reconciler
(`reconcile.setup` loads Prefect and the flows), so the names live here and both use them.
"""

from __future__ import annotations

PROCESS_POOL = "elice-process"
PRODUCTION_POOL = "elice-production"
"""The process pool of production's deployments: only a production worker polls it."""

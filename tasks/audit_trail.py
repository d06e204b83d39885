"""The approval audit trail's entries, and reading them from any store; no Prefect.

`tasks.audit` records entries (in a flow run, with its logger) and reads them through a
run's filesystem block; `cicd audit` reads them here, from the state dir's ledger directly.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.errors import LedgerError
from core.ledger import check_environment_name
from core.records import utcnow
from tasks.local_store import ObjectStore

AuditKind = Literal[
    "requested",
    "approved",
    "rejected",
    "refused",
    "timed_out",
    "frozen",
    "freeze_override",
    "green_stopped",
    "canary_stopped",
    "switched",
]
ROLLOUT_KINDS: frozenset[str] = frozenset({"green_stopped", "canary_stopped", "switched"})
"""What a blue-green or canary deploy recorded after the gate: outcomes, never an
answer's verdict."""


class AuditEntry(BaseModel):
    """One decision (or attempt) about one promotion run."""

    model_config = ConfigDict(frozen=True)

    at: datetime = Field(default_factory=utcnow)
    environment: str
    run_id: str
    release_id: str
    kind: AuditKind
    who: str = Field(description="The proven principal; for a refused answer, who it claimed")
    proof: str = Field(default="", description="ssh key fingerprint, Slack user id, or none")
    detail: str = Field(default="", description="The reason given, or why it was refused")
    statement: str = Field(default="", description="The signed statement, as received")
    signature: str = Field(default="", description="Its signature, as received")


def audit_folder(environment: str) -> str:
    """Where `environment`'s entries live in the ledger's store."""
    return f"{check_environment_name(environment)}/audit"


def read_entries(objects: ObjectStore, environment: str) -> list[AuditEntry]:
    """Every entry of the environment's audit trail, oldest first.

    Raises:
        LedgerError: an entry cannot be read.
    """
    folder = audit_folder(environment)
    entries = []
    for name in sorted(objects.names(folder)):
        data = objects.read(f"{folder}/{name}")
        if data is None:
            continue
        try:
            entries.append(AuditEntry.model_validate_json(data))
        except ValidationError as exc:
            msg = f"audit entry {folder}/{name} is corrupt: {exc.error_count()} errors"
            raise LedgerError(msg) from exc
    return sorted(entries, key=lambda e: e.at)

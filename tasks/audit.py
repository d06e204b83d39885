"""The approval audit trail: every decision about a gated promotion, append-only.

Kept beside the ledger (`<env>/audit/<time>-<id>.json`, one immutable object per
entry, created exclusively), so it survives deleting the flow run and does not depend
on Slack: approvals, rejections with their reason, timeouts, and refused answers (what
was tried, by whom it claimed to be, why it was refused), each with the evidence it
came with (the signed statement and its signature, or the Slack user).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from prefect.filesystems import WritableFileSystem
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.errors import LedgerError
from core.records import utcnow
from tasks.process import run_logger
from tasks.releases import check_environment_name
from tasks.stores import open_store

AuditKind = Literal[
    "requested",
    "approved",
    "rejected",
    "refused",
    "timed_out",
    "frozen",
    "freeze_override",
    "green_stopped",
    "switched",
]
ROLLOUT_KINDS: frozenset[str] = frozenset({"green_stopped", "switched"})
"""What a blue-green deploy recorded after the gate: outcomes, never an answer's verdict."""


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


def _folder(environment: str) -> str:
    return f"{check_environment_name(environment)}/audit"


def record_decision(store: WritableFileSystem, entry: AuditEntry) -> AuditEntry:
    """Append `entry` to the environment's audit trail (a new object; nothing overwritten).

    Raises:
        LedgerError: the store refused to create the entry.
    """
    name = f"{entry.at:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:12]}.json"
    objects = open_store(store)
    if not objects.create(f"{_folder(entry.environment)}/{name}", entry.model_dump_json().encode()):
        msg = f"audit entry {name} of {entry.environment} could not be created"
        raise LedgerError(msg)
    log = run_logger()
    text = f"audit {entry.environment}: {entry.kind} by {entry.who} ({entry.proof or 'no proof'})"
    if entry.kind == "refused":
        log.warning("%s: %s", text, entry.detail)
    else:
        log.info("%s%s", text, f": {entry.detail}" if entry.detail else "")
    return entry


def read_audit(store: WritableFileSystem, environment: str) -> list[AuditEntry]:
    """Every entry of the environment's audit trail, oldest first.

    Raises:
        LedgerError: an entry cannot be read.
    """
    objects = open_store(store)
    folder = _folder(environment)
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

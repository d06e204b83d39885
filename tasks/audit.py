"""The approval audit trail: every decision about a gated promotion, append-only.

Kept beside the ledger (`<env>/audit/<time>-<id>.json`, one immutable object per
entry, created exclusively), so it survives deleting the flow run and does not depend
on Slack: approvals, rejections with their reason, timeouts, and refused answers (what
was tried, by whom it claimed to be, why it was refused), each with the evidence it
came with (the signed statement and its signature, or the Slack user).
"""

from __future__ import annotations

import uuid

from prefect.filesystems import WritableFileSystem

from core.errors import LedgerError
from tasks.audit_trail import ROLLOUT_KINDS, AuditEntry, AuditKind, audit_folder, read_entries
from tasks.process import run_logger
from tasks.stores import open_store

__all__ = ["ROLLOUT_KINDS", "AuditEntry", "AuditKind", "read_audit", "record_decision"]


def record_decision(store: WritableFileSystem, entry: AuditEntry) -> AuditEntry:
    """Append `entry` to the environment's audit trail (a new object; nothing overwritten).

    Raises:
        LedgerError: the store refused to create the entry.
    """
    name = f"{entry.at:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:12]}.json"
    objects = open_store(store)
    if not objects.create(
        f"{audit_folder(entry.environment)}/{name}", entry.model_dump_json().encode()
    ):
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
    return read_entries(open_store(store), environment)

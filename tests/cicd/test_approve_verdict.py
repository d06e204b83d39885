"""`cicd approve` reports the gate's verdict on its answer from the audit trail: a
blue-green or canary deploy's later entries (switched, green_stopped, canary_stopped) are
outcomes, never that
verdict."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from prefect.filesystems import LocalFileSystem

from cicd.promote_cli import _verdict
from tasks.audit import AuditEntry, record_decision


def test_the_verdict_is_the_gates_not_a_later_rollout_outcome(tmp_path: Path) -> None:
    store = LocalFileSystem(basepath=str(tmp_path))
    run_id = uuid.uuid4()
    since = time.time()
    for kind in ("approved", "switched", "canary_stopped"):
        entry = AuditEntry(
            environment="bg-unit", run_id=str(run_id), release_id="r1", kind=kind, who="alice"
        )
        record_decision(store, entry)
        time.sleep(0.01)
    assert _verdict(run_id, "bg-unit", since, store)[0] == "approved"

"""The ledger where this test session's user settings keep it (ELICE_STATE_DIR...)."""

from __future__ import annotations

from blocks.storage import ledger_filesystem
from core.settings import Settings
from tasks.releases import Ledger


def current_ledger() -> Ledger:
    """The ledger the flows of this process write: the settings read now, as a run does."""
    return Ledger(ledger_filesystem(Settings.from_environ()))

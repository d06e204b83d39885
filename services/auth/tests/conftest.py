"""Every test run gets its own SQLite database, set before the app is imported."""

import os
import tempfile
from pathlib import Path

_DB_DIR = Path(tempfile.mkdtemp(prefix="auth-tests-"))
os.environ["DATABASE_URL"] = f"sqlite:///{_DB_DIR / 'auth.sqlite3'}"
os.environ["DB_POOL_SIZE"] = "2"
os.environ["DB_MAX_OVERFLOW"] = "1"

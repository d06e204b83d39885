"""Every test run gets its own SQLite database, set before the app is imported, and
removed when the run ends (the pipeline runs these tests on every CI run)."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

_DB_DIR = Path(tempfile.mkdtemp(prefix="auth-tests-"))
atexit.register(shutil.rmtree, _DB_DIR, ignore_errors=True)
os.environ["DATABASE_URL"] = f"sqlite:///{_DB_DIR / 'auth.sqlite3'}"
os.environ["DB_POOL_SIZE"] = "2"
os.environ["DB_MAX_OVERFLOW"] = "1"

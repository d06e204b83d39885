"""The project's tools found on this host, without importing anything of the pipeline."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from core.errors import ToolError


def which(tool: str) -> str:
    """The absolute path of `tool`, looked up beside this interpreter first.

    Raises:
        ToolError: the tool is not installed.
    """
    here = Path(sys.executable).parent / tool
    if here.exists():
        return str(here)
    found = shutil.which(tool)
    if found is None:
        msg = f"{tool} is not installed (looked beside {sys.executable} and on PATH)"
        raise ToolError(msg)
    return found

"""Shared service kit: ``create_app`` plus the pieces it is built from."""

from servicekit.app import ReadinessCheck, create_app
from servicekit.logs import JsonFormatter, configure_logging
from servicekit.settings import BuildInfo, Faults, env_flag, env_int, env_str, log_level

__all__ = [
    "BuildInfo",
    "Faults",
    "JsonFormatter",
    "ReadinessCheck",
    "configure_logging",
    "create_app",
    "env_flag",
    "env_int",
    "env_str",
    "log_level",
]
__version__ = "0.1.0"

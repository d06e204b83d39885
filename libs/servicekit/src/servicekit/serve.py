"""Run a service: ``python -m servicekit.serve <package>.main:app``.

Binds ``HOST`` (default 0.0.0.0) and ``PORT`` (default 8000) and keeps uvicorn's own
log lines in the JSON format. Equivalent plain command (non-JSON uvicorn lines):
``uvicorn <package>.main:app --host ${HOST:-0.0.0.0} --port ${PORT:-8000}``.
"""

from __future__ import annotations

import sys

import uvicorn

from servicekit.settings import env_int, env_str

# Containers must listen on all interfaces; the pod network is the boundary.
DEFAULT_HOST = "0.0.0.0"  # noqa: S104  # nosec B104
DEFAULT_PORT = 8000


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    target = args[0] if args else env_str("APP_MODULE", "")
    if not target:
        raise SystemExit("usage: python -m servicekit.serve <package>.main:app (or APP_MODULE)")
    uvicorn.run(
        target,
        host=env_str("HOST", DEFAULT_HOST),
        port=env_int("PORT", DEFAULT_PORT),
        log_config=None,
        access_log=False,
        proxy_headers=True,
    )


if __name__ == "__main__":  # pragma: no cover
    main()

import json
import logging
from typing import Any

import pytest
from starlette.routing import Route, Router

from servicekit import JsonFormatter, configure_logging, env_flag, env_int, log_level, serve
from servicekit.metrics import UNMATCHED, route_template


@pytest.mark.parametrize(
    ("raw", "level"),
    [
        ("DEBUG", logging.DEBUG),
        ("warn", logging.WARNING),
        ("WARNING", logging.WARNING),
        ("ERROR", logging.ERROR),
        ("bogus", logging.INFO),
        ("", logging.INFO),
    ],
)
def test_log_level(raw: str, level: int) -> None:
    assert log_level({"LOG_LEVEL": raw}) == level


def test_env_helpers() -> None:
    assert env_flag("X", {"X": "Yes"})
    assert not env_flag("X", {"X": "0"})
    assert env_int("N", 7, {"N": "x"}) == 7
    assert env_int("N", 7, {"N": "12"}) == 12


def test_json_formatter_includes_extras() -> None:
    record = logging.LogRecord("svc", logging.INFO, __file__, 1, "hi %s", ("there",), None)
    record.status = 201
    try:
        raise ValueError("bad")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    line = json.loads(JsonFormatter("demo").format(record))
    assert line["message"] == "hi there"
    assert line["service"] == "demo"
    assert line["status"] == 201
    assert line["level"] == "INFO"
    assert "ValueError: bad" in line["exc_info"]


def test_configure_logging_is_idempotent() -> None:
    configure_logging("a", {"LOG_LEVEL": "ERROR"})
    configure_logging("b", {"LOG_LEVEL": "DEBUG"})
    root = logging.getLogger()
    ours = [h for h in root.handlers if h.get_name() == "servicekit-json"]
    assert len(ours) == 1
    assert root.level == logging.DEBUG
    assert logging.getLogger("uvicorn.access").propagate


def test_route_template_fallback_matches_router() -> None:
    router = Router(routes=[Route("/a/{x}", endpoint=lambda r: None)])
    scope: dict[str, Any] = {"type": "http", "path": "/a/1", "method": "GET"}
    assert route_template(scope, router) == "/a/{x}"
    assert route_template({**scope, "path": "/b"}, router) == UNMATCHED


def test_serve_main(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(serve.uvicorn, "run", lambda t, **kw: calls.append({"t": t, **kw}))
    monkeypatch.setenv("PORT", "8004")
    monkeypatch.delenv("HOST", raising=False)
    serve.main(["course.main:app"])
    assert calls[0]["t"] == "course.main:app"
    assert calls[0]["port"] == 8004
    assert calls[0]["host"] == serve.DEFAULT_HOST
    monkeypatch.delenv("APP_MODULE", raising=False)
    with pytest.raises(SystemExit):
        serve.main([])

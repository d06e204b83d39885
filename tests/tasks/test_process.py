"""run_tool bounds what a tool can do to the pipeline: its environment, its output, its time."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from core.errors import ToolError
from tasks.masking import mask
from tasks.process import MAX_OUTPUT_BYTES, run_tool, tool_env, tool_output

PY = sys.executable


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return status != "Z"


def test_invalid_utf8_output_is_decoded_with_replacement() -> None:
    done = run_tool([PY, "-c", "import sys; sys.stdout.buffer.write(b'ok \\xff\\xfe end\\n')"])
    assert done.ok
    assert done.output == "ok \ufffd\ufffd end\n"


def test_ten_megabytes_of_output_are_capped_and_the_excess_counted() -> None:
    size = 10 * 1024 * 1024
    script = (
        "import sys; out = sys.stdout.buffer; out.write(b'FIRST\\n');"
        f"out.write(b'x' * {size}); out.write(b'\\nLAST\\n')"
    )
    limit = 1024 * 1024
    done = run_tool([PY, "-c", script], max_output=limit)
    assert done.ok
    total = size + len(b"FIRST\n") + len(b"\nLAST\n")
    dropped = total - limit
    assert done.output.startswith("FIRST\n")
    assert done.output.endswith("\nLAST\n")
    assert f"[... {dropped} bytes of output left out ...]" in done.output
    assert len(done.output) < limit + 200
    assert "LAST" in done.excerpt(1)


def test_the_default_cap_keeps_ordinary_output_whole() -> None:
    done = run_tool([PY, "-c", "print('\\n'.join(f'line {i}' for i in range(200_000)))"])
    assert done.output == "\n".join(f"line {i}" for i in range(200_000)) + "\n"
    assert len(done.output) < MAX_OUTPUT_BYTES


def test_a_hanging_tool_is_killed_with_everything_it_started(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time;"
        "child = subprocess.Popen(['sleep', '300']);"
        f"open({str(pidfile)!r}, 'w').write(str(child.pid));"
        "print('started', flush=True); time.sleep(300)"
    )
    started = time.monotonic()
    with pytest.raises(ToolError, match="timed out after 2s"):
        run_tool([PY, "-c", script], timeout=2)
    assert time.monotonic() - started < 30
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the tool's own child outlived the timeout"


def test_a_tool_gets_only_the_environment_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "admin:hunter2-hunter2")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-K7MDENG")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    env = tool_env({"EXTRA": "given"})
    assert "PREFECT_API_AUTH_STRING" not in env
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert env["LC_ALL"] == "C.UTF-8"
    assert env["EXTRA"] == "given"
    assert env["PATH"] == os.environ["PATH"]
    done = run_tool([PY, "-c", "import os; print(sorted(os.environ))"], env={"EXTRA": "given"})
    assert "PREFECT_API_AUTH_STRING" not in done.output
    assert "AWS_SECRET_ACCESS_KEY" not in done.output
    assert "'EXTRA'" in done.output


def test_secrets_given_to_a_tool_never_come_back_in_its_output() -> None:
    token = "ghp_" + "a1b2c3d4" * 4
    done = run_tool(
        [PY, "-c", "import os; print('token is', os.environ['REPO_TOKEN'])"],
        env={"REPO_TOKEN": token},
    )
    assert token not in done.output
    assert done.output == "token is ***\n"


def test_masked_values_are_scrubbed_from_every_tool_output() -> None:
    secret = "registry-password-" + os.urandom(6).hex()
    mask(secret)
    done = run_tool([PY, "-c", f"print('login with', {secret!r})"])
    assert secret not in done.output
    assert "login with ***" in done.output
    assert tool_output(f"again {secret}".encode()) == "again ***"


def test_tool_output_caps_bytes_read_back_from_a_file() -> None:
    raw = b"\xff" + b"a" * 5000 + b"z"
    text = tool_output(raw, max_output=1000)
    assert text.startswith("\ufffd")
    assert text.endswith("z")
    assert "[... 4002 bytes of output left out ...]" in text


def test_input_reaches_the_tool() -> None:
    done = run_tool([PY, "-c", "import sys; print(sys.stdin.read().upper())"], input_text="hi")
    assert done.output == "HI\n"

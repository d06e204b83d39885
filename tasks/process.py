"""Running external tools: one place that starts processes, captures and trims output.

Tool slots: the CI flow's thread pool is wide, so a task waiting for the one before it
never holds back one that could run; what is bounded (by the cores, or what the flow's
runner says) is how many tools run at once. `run_tool`, the pytest fork server and the
image build each hold a slot while their process works; a thread that holds one can
start more tools inside it without taking another.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from prefect.client.schemas.objects import State
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from prefect.tasks import exponential_backoff

from core import tools
from core.errors import ToolError
from tasks.masking import scrub_masked

which = tools.which  # found without Prefect (core.tools); the tasks import it from here

EXCERPT_LINES = 40


class _Slots:
    """At most `size` holders at once, in this process; reentrant in one thread."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._gate = threading.BoundedSemaphore(size)
        self._held = threading.local()

    @contextmanager
    def hold(self) -> Iterator[None]:
        if getattr(self._held, "depth", 0):
            self._held.depth += 1
            try:
                yield
            finally:
                self._held.depth -= 1
            return
        with self._gate:
            self._held.depth = 1
            try:
                yield
            finally:
                self._held.depth = 0


_slots = _Slots(os.cpu_count() or 2)
_slots_lock = threading.Lock()


def set_tool_slots(size: int) -> None:
    """How many tools may run at once from now on (tools running keep their slot).

    Raises:
        ValueError: `size` is below 1.
    """
    global _slots  # noqa: PLW0603 - one bound per process, set by the flow's runner
    if size < 1:
        msg = f"tool slots must be at least 1, got {size}"
        raise ValueError(msg)
    with _slots_lock:
        if _slots.size != size:
            _slots = _Slots(size)


def tool_slots() -> int:
    """How many tools may run at once."""
    return _slots.size


@contextmanager
def tool_slot() -> Iterator[None]:
    """Hold one tool slot while the block runs (at once when this thread holds one)."""
    with _slots.hold():
        yield


@dataclass(frozen=True)
class ToolRun:
    """What a finished process did."""

    args: tuple[str, ...]
    returncode: int
    output: str
    seconds: float

    @property
    def ok(self) -> bool:
        """True when the tool exited 0."""
        return self.returncode == 0

    def excerpt(self, lines: int = EXCERPT_LINES) -> str:
        """The last `lines` lines of the combined output."""
        return "\n".join(self.output.rstrip().splitlines()[-lines:])


TOOL_ENV_NAMES = frozenset(
    {
        "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM",
        "SHELL", "SSH_AUTH_SOCK", "SOURCE_DATE_EPOCH", "NO_COLOR",
        "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
        "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
        "DOCKER_HOST", "CONTAINER_HOST", "REGISTRY_AUTH_FILE",
    }
)  # fmt: skip
"""What a tool inherits of the worker's environment by name; the rest it is given."""

TOOL_ENV_PREFIXES = ("LC_", "XDG_", "UV_", "PIP_INDEX", "PIP_EXTRA_INDEX", "CONTAINERS_")
"""...and by prefix: locale, user directories, uv's and pip's index and cache settings."""

_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|PASSPHRASE|AUTH|CREDENTIAL|_KEY|^KEY|_VALUE_\d+$")

MAX_OUTPUT_BYTES = 8 * 1024 * 1024
"""A tool's output kept at most: its first and last halves, the bytes between counted."""

_KILL_WAIT_S = 10.0


def tool_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a tool runs with: the worker's locale, paths, proxies and tool
    caches (`TOOL_ENV_NAMES`, `TOOL_ENV_PREFIXES`), and `env` over them. Nothing else of
    the worker reaches a tool: no Prefect API key, cloud credential or token it holds."""
    inherited = {
        name: value
        for name, value in os.environ.items()
        if name in TOOL_ENV_NAMES or name.startswith(TOOL_ENV_PREFIXES)
    }
    return {**inherited, **(env or {})}


def env_secrets(env: Mapping[str, str]) -> list[str]:
    """The values in `env` whose names say they are secret (tokens, passwords, auth)."""
    return [value for name, value in env.items() if _SECRET_NAME.search(name.upper())]


class _Capture:
    """A pipe read to its end in a thread: the first and last `limit / 2` bytes kept, the
    bytes between counted, so a tool printing without end costs bounded memory."""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        self._stream = stream
        self._half = max(limit // 2, 1)
        self._head = bytearray()
        self._tail: collections.deque[bytes] = collections.deque()
        self._tail_size = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while chunk := os.read(self._stream.fileno(), 65536):
            room = self._half - len(self._head)
            if room > 0:
                self._head += chunk[:room]
                chunk = chunk[room:]
            if not chunk:
                continue
            self._tail.append(chunk)
            self._tail_size += len(chunk)
            while self._tail_size - len(self._tail[0]) >= self._half:
                self._tail_size -= len(self._tail[0])
                self.dropped += len(self._tail.popleft())
        self._stream.close()

    def text(self, wait_s: float) -> str:
        """The output read so far, decoded (invalid bytes replaced)."""
        self._thread.join(wait_s)
        tail = b"".join(self._tail)
        if self._tail_size > self._half:
            cut = self._tail_size - self._half
            tail = tail[cut:]
            self.dropped += cut
            self._tail_size = self._half
        return _render(bytes(self._head), tail, self.dropped)


def _render(head: bytes, tail: bytes, dropped: int) -> str:
    text = head.decode("utf-8", errors="replace")
    if dropped:
        text += f"\n[... {dropped} bytes of output left out ...]\n"
    return text + tail.decode("utf-8", errors="replace")


def tool_output(
    raw: bytes, *, secrets: Sequence[str | None] = (), max_output: int = MAX_OUTPUT_BYTES
) -> str:
    """A tool's output as `run_tool` keeps it: capped (its middle left out and counted),
    decoded with invalid bytes replaced, scrubbed of masked values and `secrets`."""
    half = max(max_output // 2, 1)
    if len(raw) > 2 * half:
        text = _render(raw[:half], raw[-half:], len(raw) - 2 * half)
    else:
        text = _render(raw, b"", 0)
    return scrub_masked(text, secrets)


def run_tool(
    args: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
    input_text: str | None = None,
    secrets: Sequence[str | None] = (),
    max_output: int = MAX_OUTPUT_BYTES,
) -> ToolRun:
    """Run a tool to completion, capturing stdout and stderr together.

    The tool gets `tool_env(env)`, in a process group of its own. Its output is decoded
    with invalid bytes replaced, capped at `max_output` bytes (the middle left out and
    counted) and scrubbed of every masked secret, `secrets` and the secret values of
    `env`. On timeout the whole group is killed: nothing the tool started outlives it.
    A non-zero exit is returned, not raised: the caller decides what it means.

    Raises:
        ToolError: the tool could not be started or timed out.
    """
    full_env = tool_env(env)
    hidden = [*secrets, *env_secrets(env or {})]
    started = time.monotonic()
    with tool_slot():
        try:
            process = subprocess.Popen(
                list(args),
                cwd=cwd,
                env=full_env,
                stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            msg = f"cannot run {args[0]}: {exc.strerror}"
            raise ToolError(msg) from exc
        assert process.stdout is not None  # noqa: S101 - PIPE above
        capture = _Capture(process.stdout, max_output)
        if process.stdin is not None:
            _feed(process.stdin, input_text or "")
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            _kill_group(process)
            msg = f"{' '.join(args[:3])} timed out after {timeout:.0f}s (its processes killed)"
            raise ToolError(msg) from exc
        output = capture.text(_KILL_WAIT_S)
    return ToolRun(
        tuple(args), returncode, scrub_masked(output, hidden), time.monotonic() - started
    )


def _feed(stdin: IO[bytes], text: str) -> None:
    def write() -> None:
        with contextlib.suppress(OSError):
            stdin.write(text.encode("utf-8"))
        with contextlib.suppress(OSError):
            stdin.close()

    threading.Thread(target=write, daemon=True).start()


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """Kill the tool's process group (it leads one: start_new_session) and reap the tool."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=_KILL_WAIT_S)


def run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The Prefect run logger inside a flow or task, a module logger outside (e.g. `.fn`)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("elice")


def retry_on_tool_error(task: object, task_run: object, state: State[Any]) -> bool:  # noqa: ARG001
    """Prefect retry condition: retry only when a tool or daemon could not run.

    A lint finding, a failing test or a refused image is final: retrying cannot help.
    """
    try:
        state.result()
    except ToolError:
        return True
    except Exception:  # noqa: BLE001 - anything else is not worth a retry
        return False
    return False


STAGE_RETRY_OPTIONS: dict[str, Any] = {
    "retries": 2,
    "retry_delay_seconds": exponential_backoff(backoff_factor=1),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_on_tool_error,
}
"""Task options for a step that runs a tool: exponential backoff with jitter, ToolError only."""

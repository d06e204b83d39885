"""What the monitoring tests share: the real tools, loopback servers, the config under test."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.plugins.lifetime import stop, tied

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "monitoring"
PROMETHEUS_DIR = MONITORING / "prometheus"
PROMETHEUS_YML = PROMETHEUS_DIR / "prometheus.yml"
FLAGS = PROMETHEUS_DIR / "flags"
ALERTMANAGER_YML = MONITORING / "alertmanager" / "alertmanager.yml"
# What a pod's service account mounts; Debian's promtool checks these files exist.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def tool(name: str) -> str:
    """Absolute path of a required tool; a missing tool fails the test, never skips it."""
    path = shutil.which(name)
    assert path, f"{name} not found on PATH: apt-get install prometheus prometheus-alertmanager"
    return path


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a tool and fail with its command line and output when it exits non-zero."""
    cmd = [str(a) for a in args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited {proc.returncode}\n"
        f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )
    return proc


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


def post_json(url: str, body: Any) -> None:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200, resp.read()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except (OSError, urllib.error.URLError, KeyError, ValueError) as e:
            last_error = e
        else:
            if result:
                return result
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout}s waiting for {what} (last error: {last_error!r})")


def start_server(cmd: list[str], ready_url: str, log: Path) -> subprocess.Popen[bytes]:
    """Start a server process writing to ``log`` and wait until ``ready_url`` answers."""
    with log.open("wb") as out:
        proc = subprocess.Popen(tied(cmd), stdout=out, stderr=subprocess.STDOUT)

    def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"{cmd[0]} exited {proc.returncode}:\n{log.read_text()}")
        with urllib.request.urlopen(ready_url, timeout=2) as resp:
            return bool(resp.status == 200)

    try:
        wait_for(f"{cmd[0]} at {ready_url}", ready)
    except BaseException:
        stop_server(proc)
        raise
    return proc


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    stop(proc, timeout=15)


def flags() -> dict[str, str | None]:
    """``--name=value`` (or a bare boolean ``--name``) per line of monitoring/prometheus/flags."""
    parsed: dict[str, str | None] = {}
    for raw in FLAGS.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        assert line.startswith("--"), f"not a flag: {line!r}"
        name, sep, value = line.removeprefix("--").partition("=")
        parsed[name] = value if sep else None
    return parsed


def as_file_sd(config: dict[str, Any], targets_dir: Path) -> dict[str, Any]:
    """The same config with kubernetes_sd_configs replaced by file_sd_configs.

    Debian's Prometheus is built without Kubernetes discovery, so it rejects the real
    kubernetes_sd_configs; everything else (relabeling, rules, alerting) stays as it is
    and is what promtool and the server check. Files a pod's service account would mount
    are written empty into ``targets_dir``: promtool checks that they exist.
    """
    text = json.dumps(config).replace(SERVICE_ACCOUNT_DIR, str(targets_dir / "serviceaccount"))
    (targets_dir / "serviceaccount").mkdir(exist_ok=True)
    for name in ("token", "ca.crt"):
        (targets_dir / "serviceaccount" / name).touch()
    config = json.loads(text)
    config["rule_files"] = [str(PROMETHEUS_DIR / pattern) for pattern in config["rule_files"]]
    for job in config["scrape_configs"]:
        if job.pop("kubernetes_sd_configs", None) is not None:
            targets = targets_dir / f"{job['job_name']}.json"
            if not targets.exists():
                targets.write_text("[]", encoding="utf-8")
            job["file_sd_configs"] = [{"files": [str(targets)]}]
    return config


def start_prometheus(config: dict[str, Any], tmp_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Run the real Prometheus with ./flags on ``config``; return the process and its address."""
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    overrides = {
        "config.file": str(tmp_path / "prometheus.yml"),
        "storage.tsdb.path": str(tmp_path / "data"),
    }
    web = f"127.0.0.1:{free_port()}"
    args = [f"--{k}" if v is None else f"--{k}={overrides.get(k, v)}" for k, v in flags().items()]
    proc = start_server(
        [tool("prometheus"), *args, f"--web.listen-address={web}"],
        f"http://{web}/-/ready",
        tmp_path / "prometheus.log",
    )
    return proc, web

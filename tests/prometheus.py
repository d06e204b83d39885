"""A real Prometheus for analysis tests, configured the way the local stack configures its own
(`stack/monitoring_config.py`: the project's job, rules and labels, file-discovered targets),
scraping every second so the tests' intervals stay short."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

from blocks.config import PipelineConfig
from stack.monitoring_config import prometheus_config, scrape_targets
from stack.ports import free_port
from tests.monitoring.tools import tool
from tests.plugins.lifetime import stop, tied


@contextmanager
def running_prometheus(
    folder: Path, config: PipelineConfig | None = None, green_targets: Path | None = None
) -> Iterator[str]:
    """A Prometheus on a free loopback port scraping `config`'s services (none: nothing)
    and the green containers whose targets are written into `green_targets`, evaluating
    the project's rules every second; yields its URL, stops it after."""
    folder.mkdir(parents=True, exist_ok=True)
    targets = folder / "targets.json"
    targets.write_text(
        json.dumps(scrape_targets(config) if config is not None else []), encoding="utf-8"
    )
    settings = prometheus_config(
        targets,
        "127.0.0.1:1",
        scrape_interval="1s",
        evaluation_interval="1s",
        green_targets=green_targets,
    )
    settings["scrape_configs"][0]["file_sd_configs"][0]["refresh_interval"] = "1s"
    config_file = folder / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (folder / "prometheus.log").open("wb")
    process = subprocess.Popen(
        tied(
            [
                tool("prometheus"),
                f"--config.file={config_file}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ]
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, (folder / "prometheus.log").read_text()
            assert time.monotonic() < deadline, "Prometheus did not become ready in 60 s"
            time.sleep(0.3)
        yield url
    finally:
        stop(process, timeout=30)
        log.close()

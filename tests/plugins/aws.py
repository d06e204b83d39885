"""moto server for the AWS APIs (ECR, S3).

Session fixtures:
- `moto_endpoint`: URL of a real `moto_server` on a free loopback port (started once).
- `aws_credentials`: prefect-aws `AwsCredentials` with dummy keys, region us-east-1;
  pass `moto_endpoint` as the client's endpoint_url.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest
from prefect_aws import AwsCredentials

from stack.ports import free_port
from tasks.process import which
from tests.plugins.lifetime import stop, tied


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A real moto server (all AWS services) for the session."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        tied([which("moto_server"), "-H", "127.0.0.1", "-p", str(port)]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/moto-api/data.json", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"moto_server did not answer on {url} (exit {proc.poll()})")
            time.sleep(0.2)
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def aws_credentials() -> AwsCredentials:
    """Dummy AWS credentials (moto accepts any)."""
    return AwsCredentials(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )

"""Registries that need a login: real `docker-registry` processes on loopback.

Session fixtures:
- `basic_registry`: `AuthRegistry` behind htpasswd Basic auth (bcrypt entry from
  `htpasswd -B`, Debian's apache2-utils).
- `token_registry`: `AuthRegistry` behind the distribution token spec: the registry
  answers 401 with a `Bearer realm=...,service=...,scope=...` challenge and trusts JWTs
  signed with the key of `rootcertbundle`; `token_server` issues them.
- `token_server`: `TokenServer`, a small token server of the distribution spec
  (GET realm?service=...&scope=...; Basic credentials; RS256 JWT with an x5c header).
  Anonymous callers get a token with no access, as public token servers answer.
- `ecr_image_registry`: `AuthRegistry` behind Basic auth accepting the login moto's
  GetAuthorizationToken returns: ECR's registry endpoint for the ECR tests.
- `clean_engine`: a docker-py client of a second Podman API service with an empty image
  store, trusting both registries over plain HTTP: what a fresh cluster node sees.

Each `AuthRegistry` carries an `OciRegistry` block with its credentials (`.block`) and
the registry's log file (`.log`, access lines included).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import docker
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from prefect_aws import AwsCredentials
from pydantic import SecretStr

from blocks.registry import OciRegistry
from blocks.stack import StackInfo
from stack.engine import CONTAINERS_CONF
from stack.ports import free_port
from tests.plugins.lifetime import stop, tied

TOKEN_SERVICE = "elice-test-registry"
TOKEN_ISSUER = "elice-test-token-issuer"

REGISTRY_CONF = """\
version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {data}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
  secret: {secret}
auth:
{auth}
"""


def _require(tool: str, package: str) -> str:
    found = shutil.which(tool)
    if found is None:
        pytest.fail(f"{tool} is not installed: apt-get install {package}", pytrace=False)
    return found


@dataclass
class AuthRegistry:
    """A running registry that needs a login."""

    block: OciRegistry
    log: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def address(self) -> str:
        """127.0.0.1:PORT."""
        return self.block.address

    @property
    def username(self) -> str:
        """The user the registry (or its token server) accepts."""
        assert self.block.username is not None
        return self.block.username.get_secret_value()

    @property
    def password(self) -> str:
        """That user's password."""
        assert self.block.password is not None
        return self.block.password.get_secret_value()

    def anonymous(self) -> OciRegistry:
        """The same registry without credentials."""
        return self.block.model_copy(update={"username": None, "password": None})


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """The distribution token spec's authorization server, on a loopback port."""

    def __init__(self, directory: Path, username: str, password: str) -> None:
        self.username = username
        self.password = password
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TOKEN_ISSUER)])
        now = dt.datetime.now(dt.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.bundle = directory / "token-root.pem"
        self.bundle.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        self.requests: list[dict[str, Any]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.realm = f"http://127.0.0.1:{self._server.server_address[1]}/token"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def token(self, scopes: list[str], subject: str) -> str:
        """An RS256 JWT granting every action of `scopes` (empty: no access)."""
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {
            "typ": "JWT",
            "alg": "RS256",
            "x5c": [
                base64.b64encode(self.certificate.public_bytes(serialization.Encoding.DER)).decode()
            ],
        }
        claims = {
            "iss": TOKEN_ISSUER,
            "sub": subject,
            "aud": TOKEN_SERVICE,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signed = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self.key.sign(signed.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signed}.{_b64url(signature)}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                header = self.headers.get("Authorization", "")
                subject = ""
                if header.startswith("Basic "):
                    user, _, password = base64.b64decode(header[6:]).decode().partition(":")
                    if (user, password) != (server.username, server.password):
                        self._answer(401, {"details": "wrong username or password"})
                        return
                    subject = user
                server.requests.append(
                    {"service": query.get("service"), "scope": query.get("scope"), "sub": subject}
                )
                if url.path != "/token" or query.get("service") != [TOKEN_SERVICE]:
                    self._answer(400, {"details": "unknown service"})
                    return
                scopes = query.get("scope", []) if subject else []
                token = server.token(scopes, subject)
                self._answer(200, {"token": token, "access_token": token, "expires_in": 300})

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


def _start_registry(directory: Path, auth: str, block: OciRegistry) -> AuthRegistry:
    binary = _require("docker-registry", "docker-registry")
    port = int(block.address.rpartition(":")[2])
    data = directory / "data"
    data.mkdir(parents=True)
    conf = directory / "config.yml"
    conf.write_text(
        REGISTRY_CONF.format(data=data, port=port, secret=secrets.token_hex(16), auth=auth),
        encoding="utf-8",
    )
    log = directory / "registry.log"
    with log.open("wb") as out:
        serve = tied([binary, "serve", str(conf)])
        proc = subprocess.Popen(serve, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"http://{block.address}/v2/", timeout=2).status_code in (200, 401):
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            text = log.read_text(encoding="utf-8", errors="replace")[-2000:]
            pytest.fail(f"docker-registry on {block.address} did not start:\n{text}")
        time.sleep(0.1)
    return AuthRegistry(block=block, log=log, process=proc)


def _htpasswd_registry(directory: Path, user: str, password: str) -> AuthRegistry:
    htpasswd = _require("htpasswd", "apache2-utils")
    entry = subprocess.run(
        [htpasswd, "-niB", user], input=password, capture_output=True, text=True, check=True
    ).stdout.strip()
    (directory / "htpasswd").write_text(entry + "\n", encoding="utf-8")
    auth = f"  htpasswd:\n    realm: elice-test\n    path: {directory / 'htpasswd'}\n"
    block = OciRegistry(
        address=f"127.0.0.1:{free_port()}",
        namespace="elice",
        insecure=True,
        username=SecretStr(user),
        password=SecretStr(password),
    )
    return _start_registry(directory, auth, block)


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthRegistry]:
    """docker-registry behind htpasswd Basic auth."""
    directory = tmp_path_factory.mktemp("basic-registry")
    registry = _htpasswd_registry(directory, "ci-basic", secrets.token_urlsafe(18))
    yield registry
    stop(registry.process)


@pytest.fixture(scope="session")
def ecr_image_registry(
    tmp_path_factory: pytest.TempPathFactory, moto_endpoint: str, aws_credentials: AwsCredentials
) -> Iterator[AuthRegistry]:
    """A Basic-auth docker-registry standing in for ECR's registry endpoint.

    It accepts exactly the login moto's GetAuthorizationToken hands out (moto has no
    registry protocol), so ECR's image path runs end to end with the token it issued.
    """
    session = aws_credentials.get_boto3_session()
    ecr = session.client("ecr", region_name="us-east-1", endpoint_url=moto_endpoint)
    token = ecr.get_authorization_token()["authorizationData"][0]["authorizationToken"]
    user, _, password = base64.b64decode(token).decode().partition(":")
    registry = _htpasswd_registry(tmp_path_factory.mktemp("ecr-registry"), user, password)
    yield registry
    stop(registry.process)


@pytest.fixture(scope="session")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    """A distribution-spec token server that knows one user."""
    server = TokenServer(tmp_path_factory.mktemp("token-server"), "ci-token", secrets.token_hex(12))
    yield server
    server.close()


@pytest.fixture(scope="session")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory, token_server: TokenServer
) -> Iterator[AuthRegistry]:
    """docker-registry behind token auth (Bearer challenge, JWTs from `token_server`)."""
    directory = tmp_path_factory.mktemp("token-registry")
    auth = (
        "  token:\n"
        f"    realm: {token_server.realm}\n"
        f"    service: {TOKEN_SERVICE}\n"
        f"    issuer: {TOKEN_ISSUER}\n"
        f"    rootcertbundle: {token_server.bundle}\n"
    )
    block = OciRegistry(
        address=f"127.0.0.1:{free_port()}",
        namespace="elice",
        insecure=True,
        username=SecretStr(token_server.username),
        password=SecretStr(token_server.password),
    )
    registry = _start_registry(directory, auth, block)
    yield registry
    stop(registry.process)


@pytest.fixture(scope="session")
def clean_engine(
    stack: StackInfo,
    basic_registry: AuthRegistry,
    token_registry: AuthRegistry,
    ecr_image_registry: AuthRegistry,
) -> Iterator[docker.DockerClient]:
    """A second Podman API service with an empty image store (nothing cached)."""
    podman = _require("podman", "podman")
    # the engine's storage must not sit on tmpfs or overlayfs: keep it beside the stack's
    root = Path(stack.docker_host.removeprefix("unix://")).parent / f"clean-{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True)
    (root / "containers.conf").write_text(
        CONTAINERS_CONF.format(pause="none", tmp=root), encoding="utf-8"
    )
    entries = "".join(
        f'\n[[registry]]\nlocation = "{r.address}"\ninsecure = true\n'
        for r in (basic_registry, token_registry, ecr_image_registry)
    )
    (root / "registries.conf").write_text(
        f"unqualified-search-registries = []\n{entries}", encoding="utf-8"
    )
    sock = root / "podman.sock"
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "TMPDIR": str(root),
        "CONTAINERS_CONF": str(root / "containers.conf"),
        "CONTAINERS_REGISTRIES_CONF": str(root / "registries.conf"),
    }
    with (root / "podman.log").open("wb") as out:
        proc = subprocess.Popen(
            [
                podman,
                "--root",
                str(root / "storage"),
                "--runroot",
                str(root / "run"),
                # its own libpod tmpdir: the default (/run/libpod) is the stack engine's,
                # whose exit files a shared one (and `system reset`) would disturb
                "--tmpdir",
                str(root / "tmp"),
                "system",
                "service",
                "--time=0",
                f"unix://{sock}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    client: docker.DockerClient | None = None
    try:
        deadline = time.monotonic() + 60
        while client is None:
            try:
                if sock.exists():
                    client = docker.DockerClient(base_url=f"unix://{sock}", timeout=600)
            except docker.errors.DockerException:
                client = None
            if client is None and (proc.poll() is not None or time.monotonic() > deadline):
                text = (root / "podman.log").read_text(encoding="utf-8", errors="replace")
                pytest.fail(f"podman system service did not start:\n{text[-2000:]}")
            time.sleep(0.2)
        assert client.images.list() == [], "the clean engine is not clean"
        yield client
    finally:
        if client is not None:
            client.close()
        stop(proc)
        subprocess.run(
            [
                podman,
                "--root",
                str(root / "storage"),
                "--runroot",
                str(root / "run"),
                # its own libpod tmpdir: the default (/run/libpod) is the stack engine's,
                # whose exit files a shared one (and `system reset`) would disturb
                "--tmpdir",
                str(root / "tmp"),
                "system",
                "reset",
                "--force",
            ],
            env=env,
            capture_output=True,
            check=False,
        )
        shutil.rmtree(root, ignore_errors=True)

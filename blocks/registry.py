"""Image registries: any OCI (Docker v2) registry, or Amazon ECR."""

from __future__ import annotations

from prefect.blocks.core import Block
from prefect_aws import AwsCredentials
from pydantic import Field, SecretStr, field_validator


class OciRegistry(Block):
    """An OCI distribution (Docker Registry v2) endpoint: the local default."""

    _block_type_name = "Elice OCI Registry"
    _description = "A Docker Registry v2 / OCI distribution endpoint images are pushed to."

    address: str = Field(description="host:port of the registry, e.g. 127.0.0.1:5000")
    namespace: str = Field(default="elice", description="Path prefix of every repository")
    insecure: bool = Field(default=False, description="Plain HTTP instead of HTTPS")
    username: SecretStr | None = Field(default=None, description="Basic-auth user, if any")
    password: SecretStr | None = Field(default=None, description="Basic-auth password, if any")
    timeout_s: float = Field(
        default=60,
        gt=0,
        le=600,
        description="Seconds one request to the registry may wait (connect, read, write); "
        "a request that waits longer is a blip, retried like a 5xx",
    )

    @field_validator("address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if "://" in value or "/" in value or not value:
            msg = f"address must be host[:port] without scheme or path, got {value!r}"
            raise ValueError(msg)
        return value

    @property
    def base_url(self) -> str:
        """http(s)://address."""
        return f"{'http' if self.insecure else 'https'}://{self.address}"

    def repository(self, service: str) -> str:
        """address/namespace/service."""
        return "/".join(p for p in (self.address, self.namespace.strip("/"), service) if p)


class EcrRegistry(Block):
    """Amazon ECR (or moto's ECR API): repositories, lifecycle, tag copies."""

    _block_type_name = "Elice ECR Registry"
    _description = "Amazon ECR repositories for the services: scan on push, immutable tags."

    aws_credentials: AwsCredentials = Field(description="prefect-aws credentials")
    region: str = Field(default="us-east-1", description="AWS region of the registry")
    endpoint_url: str | None = Field(default=None, description="Custom API endpoint (moto)")
    registry_endpoint: str | None = Field(
        default=None,
        description=(
            "The registry (image) endpoint when not the proxyEndpoint that "
            "GetAuthorizationToken returns, e.g. https://<VPC endpoint host>; "
            "http:// only for a loopback test registry"
        ),
    )
    namespace: str = Field(default="elice", description="Repository name prefix")
    keep_last_releases: int = Field(
        default=30, ge=1, le=1000, description="Tagged images the lifecycle policy keeps"
    )
    scan_on_push: bool = Field(default=True, description="Scan images when pushed")
    immutable_tags: bool = Field(default=True, description="Refuse to move an existing tag")

    @field_validator("registry_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme, _, host = value.rstrip("/").partition("://")
        loopback = host.startswith(("127.", "localhost", "[::1]"))
        if (
            not host
            or "/" in host
            or scheme not in ("https", "http")
            or (scheme == "http" and not loopback)
        ):
            msg = (
                f"registry_endpoint must be https://host[:port] (http:// only on loopback), "
                f"got {value!r}"
            )
            raise ValueError(msg)
        return f"{scheme}://{host}"

    def repository_name(self, service: str) -> str:
        """namespace/service, the ECR repository name."""
        return "/".join(p for p in (self.namespace.strip("/"), service) if p)

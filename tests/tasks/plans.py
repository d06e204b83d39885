"""Promotion fixtures shared by the ledger's and the scan gate's tests: a two-environment
configuration and ledger states built from (digest, verified, scan) triples."""

from __future__ import annotations

from core.records import ImageRef
from tasks.releases import EnvironmentState, ReleaseRecord

D1, D2, D3 = ("sha256:" + c * 64 for c in "123")


def image(service: str, digest: str, commit: str) -> ImageRef:
    return ImageRef(
        service=service, repository=f"127.0.0.1:5000/elice/{service}", digest=digest, commit=commit
    )


PLAN_CONFIG = {
    "services": [{"name": "auth", "port": 8002}, {"name": "course", "port": 8004}],
    "environments": [
        {
            "name": "q-dev",
            "namespace": "q-dev",
            "replicas": {"min": 1, "max": 1},
            "log_level": "INFO",
            "storage": "minio",
            "local_port_offset": 1,
        },
        {
            "name": "q-prod",
            "namespace": "q-prod",
            "replicas": {"min": 1, "max": 1},
            "log_level": "WARN",
            "storage": "s3",
            "promotes_from": "q-dev",
            "local_port_offset": 2,
        },
    ],
}


def ledger_state(env: str, **records: tuple[str, bool, str | None]) -> EnvironmentState:
    return EnvironmentState(
        environment=env,
        services={
            name: ReleaseRecord(
                service=name,
                environment=env,
                image=image(name, digest, "d" * 40),
                release_id="ci-1",
                verified=verified,
                ref="refs/heads/main",
                scan=scan,  # type: ignore[arg-type]
            )
            for name, (digest, verified, scan) in records.items()
        },
    )

"""Edge router: resolve a public path to the upstream service that owns it."""

from __future__ import annotations

from authn import CurrentUser
from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel
from servicekit import create_app, env_str

# public path prefix -> (upstream service, its port)
ROUTES: dict[str, tuple[str, int]] = {
    "/auth": ("auth", 8002),
    "/users": ("user", 8003),
    "/courses": ("course", 8004),
    "/enrollments": ("enrollment", 8005),
    "/lessons": ("content", 8006),
    "/quizzes": ("assessment", 8007),
    "/notifications": ("notification", 8008),
    "/payments": ("payment", 8009),
    "/search": ("search", 8010),
    "/events": ("analytics", 8011),
    "/uploads": ("media", 8012),
}


class Upstream(BaseModel):
    prefix: str
    service: str
    url: str


def upstream_base(service: str, port: int) -> str:
    """``UPSTREAM_<SERVICE>`` overrides the in-cluster default ``http://<service>:<port>``."""
    return env_str(f"UPSTREAM_{service.upper()}", f"http://{service}:{port}").rstrip("/")


def resolve(path: str) -> Upstream:
    """Longest matching prefix wins; a prefix matches whole path segments only."""
    for prefix in sorted(ROUTES, key=len, reverse=True):
        if path == prefix or path.startswith(prefix + "/"):
            service, port = ROUTES[prefix]
            return Upstream(prefix=prefix, service=service, url=upstream_base(service, port) + path)
    raise HTTPException(status_code=404, detail=f"no upstream for {path!r}")


router = APIRouter(tags=["gateway"])


@router.get("/routes")
def list_routes() -> list[Upstream]:
    return [resolve(prefix) for prefix in sorted(ROUTES)]


@router.get("/resolve")
def resolve_path(path: str = Query(pattern=r"^/[\w\-/.]*$", max_length=512)) -> Upstream:
    return resolve(path)


@router.get("/whoami")
def whoami(user: CurrentUser) -> dict[str, object]:
    return {"subject": user.subject, "scopes": sorted(user.scopes)}


app = create_app("api-gateway", routers=[router])

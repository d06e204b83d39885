"""User profiles: read and edit your own, read anyone's public view."""

from __future__ import annotations

from authn import CurrentUser
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field
from servicekit import create_app

LOCALES = {"ko-KR", "en-US", "ja-JP"}


class Profile(BaseModel):
    username: str
    display_name: str
    locale: str = "ko-KR"
    bio: str = ""


class ProfileUpdate(BaseModel):
    display_name: str | None = Field(default=None, min_length=1, max_length=60)
    locale: str | None = None
    bio: str | None = Field(default=None, max_length=280)


_profiles: dict[str, Profile] = {}

router = APIRouter(prefix="/users", tags=["users"])


def _own(username: str) -> Profile:
    return _profiles.setdefault(username, Profile(username=username, display_name=username))


@router.get("/me")
def read_me(user: CurrentUser) -> Profile:
    return _own(user.subject)


@router.patch("/me")
def update_me(changes: ProfileUpdate, user: CurrentUser) -> Profile:
    if changes.locale is not None and changes.locale not in LOCALES:
        raise HTTPException(status_code=422, detail=f"locale must be one of {sorted(LOCALES)}")
    updated = _own(user.subject).model_copy(update=changes.model_dump(exclude_none=True))
    _profiles[user.subject] = updated
    return updated


@router.get("/{username}")
def read_public(username: str) -> dict[str, str]:
    profile = _profiles.get(username)
    if profile is None:
        raise HTTPException(status_code=404, detail="no such user")
    return {"username": profile.username, "display_name": profile.display_name}


app = create_app("user", routers=[router])

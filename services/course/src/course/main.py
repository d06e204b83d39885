"""Course catalogue: list with filters, fetch one by slug."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel
from servicekit import create_app

Level = Literal["beginner", "intermediate", "advanced"]


class Course(BaseModel):
    slug: str
    title: str
    level: Level
    hours: int
    tags: list[str]


CATALOGUE: dict[str, Course] = {
    c.slug: c
    for c in (
        Course(
            slug="python-101", title="Python Basics", level="beginner", hours=12, tags=["python"]
        ),
        Course(
            slug="data-viz",
            title="Data Visualisation",
            level="intermediate",
            hours=8,
            tags=["python", "data"],
        ),
        Course(
            slug="ml-intro",
            title="Intro to Machine Learning",
            level="intermediate",
            hours=20,
            tags=["ml", "data"],
        ),
        Course(
            slug="k8s-ops",
            title="Kubernetes Operations",
            level="advanced",
            hours=16,
            tags=["devops"],
        ),
    )
}

router = APIRouter(prefix="/courses", tags=["courses"])


@router.get("")
def list_courses(
    level: Level | None = None,
    tag: str | None = None,
    max_hours: int | None = Query(default=None, ge=1),
) -> list[Course]:
    """Catalogue, optionally filtered by level, tag and maximum length."""
    return [
        c
        for c in sorted(CATALOGUE.values(), key=lambda c: c.title)
        if (level is None or c.level == level)
        and (tag is None or tag in c.tags)
        and (max_hours is None or c.hours <= max_hours)
    ]


@router.get("/{slug}")
def get_course(slug: str) -> Course:
    try:
        return CATALOGUE[slug]
    except KeyError:
        raise HTTPException(status_code=404, detail=f"no course {slug!r}") from None


app = create_app("course", routers=[router])

"""Lessons: ordered lesson list per course, one lesson with its reading-time estimate."""

from __future__ import annotations

import math
import re

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, computed_field
from servicekit import create_app, env_int

WORDS_PER_MINUTE = env_int("WORDS_PER_MINUTE", 200)
_WORD = re.compile(r"[\w'-]+")


class Lesson(BaseModel):
    id: str
    course: str
    position: int
    title: str
    body: str

    @computed_field  # type: ignore[prop-decorator]
    @property
    def reading_minutes(self) -> int:
        return max(1, math.ceil(len(_WORD.findall(self.body)) / WORDS_PER_MINUTE))


LESSONS: list[Lesson] = [
    Lesson(
        id="py-2",
        course="python-101",
        position=2,
        title="Functions",
        body="Functions group statements. " * 120,
    ),
    Lesson(
        id="py-1",
        course="python-101",
        position=1,
        title="Variables",
        body="A variable names a value.",
    ),
    Lesson(
        id="k8s-1",
        course="k8s-ops",
        position=1,
        title="Pods",
        body="A pod is the smallest deployable unit.",
    ),
]

router = APIRouter(tags=["lessons"])


@router.get("/courses/{course}/lessons")
def course_lessons(course: str) -> list[dict[str, object]]:
    """Table of contents in teaching order (no bodies)."""
    lessons = sorted((x for x in LESSONS if x.course == course), key=lambda x: x.position)
    if not lessons:
        raise HTTPException(status_code=404, detail=f"no lessons for {course!r}")
    return [x.model_dump(exclude={"body"}) for x in lessons]


@router.get("/lessons/{lesson_id}")
def get_lesson(lesson_id: str) -> Lesson:
    for lesson in LESSONS:
        if lesson.id == lesson_id:
            return lesson
    raise HTTPException(status_code=404, detail="no such lesson")


app = create_app("content", routers=[router])

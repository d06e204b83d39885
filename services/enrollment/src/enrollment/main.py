"""Enrollments: join a course (capacity and duplicate checks), list and withdraw."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

from authn import CurrentUser
from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, Field
from servicekit import create_app

# course slug -> seats; the course service owns the catalogue, this is the seat plan.
CAPACITY: dict[str, int] = {"python-101": 200, "data-viz": 40, "ml-intro": 60, "k8s-ops": 2}


class EnrollmentRequest(BaseModel):
    course: str = Field(min_length=1, max_length=64)


class Enrollment(BaseModel):
    id: int
    course: str
    student: str
    enrolled_at: datetime


_enrollments: dict[int, Enrollment] = {}
_ids = itertools.count(1)

router = APIRouter(prefix="/enrollments", tags=["enrollments"])


@router.post("", status_code=status.HTTP_201_CREATED)
def enroll(request: EnrollmentRequest, user: CurrentUser) -> Enrollment:
    seats = CAPACITY.get(request.course)
    if seats is None:
        raise HTTPException(status_code=404, detail=f"unknown course {request.course!r}")
    taken = [e for e in _enrollments.values() if e.course == request.course]
    if any(e.student == user.subject for e in taken):
        raise HTTPException(status_code=409, detail="already enrolled")
    if len(taken) >= seats:
        raise HTTPException(status_code=409, detail="course is full")
    enrollment = Enrollment(
        id=next(_ids), course=request.course, student=user.subject, enrolled_at=datetime.now(UTC)
    )
    _enrollments[enrollment.id] = enrollment
    return enrollment


@router.get("")
def my_enrollments(user: CurrentUser) -> list[Enrollment]:
    return [e for e in _enrollments.values() if e.student == user.subject]


@router.delete("/{enrollment_id}", status_code=status.HTTP_204_NO_CONTENT)
def withdraw(enrollment_id: int, user: CurrentUser) -> None:
    enrollment = _enrollments.get(enrollment_id)
    if enrollment is None or enrollment.student != user.subject:
        raise HTTPException(status_code=404, detail="no such enrollment")
    del _enrollments[enrollment_id]


app = create_app("enrollment", routers=[router])

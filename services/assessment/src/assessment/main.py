"""Quizzes: show questions without answers, grade a submission."""

from __future__ import annotations

from authn import CurrentUser
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel
from servicekit import create_app

PASS_RATIO = 0.7


class Question(BaseModel):
    id: str
    prompt: str
    choices: list[str]
    answer: int
    points: int = 1


class Submission(BaseModel):
    answers: dict[str, int]


class Grade(BaseModel):
    quiz: str
    student: str
    score: int
    max_score: int
    passed: bool
    wrong: list[str]


QUIZZES: dict[str, list[Question]] = {
    "python-basics": [
        Question(id="q1", prompt="len('abc')?", choices=["2", "3", "4"], answer=1),
        Question(id="q2", prompt="Immutable type?", choices=["list", "dict", "tuple"], answer=2),
        Question(id="q3", prompt="3 // 2?", choices=["1", "1.5", "2"], answer=0, points=2),
    ],
}

router = APIRouter(prefix="/quizzes", tags=["quizzes"])


def _quiz(quiz_id: str) -> list[Question]:
    if quiz_id not in QUIZZES:
        raise HTTPException(status_code=404, detail="no such quiz")
    return QUIZZES[quiz_id]


@router.get("/{quiz_id}")
def show_quiz(quiz_id: str) -> list[dict[str, object]]:
    return [q.model_dump(exclude={"answer"}) for q in _quiz(quiz_id)]


@router.post("/{quiz_id}/submissions")
def grade(quiz_id: str, submission: Submission, user: CurrentUser) -> Grade:
    questions = _quiz(quiz_id)
    unknown = set(submission.answers) - {q.id for q in questions}
    if unknown:
        raise HTTPException(status_code=422, detail=f"unknown questions {sorted(unknown)}")
    wrong = [q.id for q in questions if submission.answers.get(q.id) != q.answer]
    max_score = sum(q.points for q in questions)
    score = sum(q.points for q in questions if q.id not in wrong)
    return Grade(
        quiz=quiz_id,
        student=user.subject,
        score=score,
        max_score=max_score,
        passed=score >= PASS_RATIO * max_score,
        wrong=wrong,
    )


app = create_app("assessment", routers=[router])

"""Notifications: render a named template with variables into an in-memory outbox."""

from __future__ import annotations

import itertools
from string import Template
from typing import Literal

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, Field
from servicekit import create_app

TEMPLATES: dict[str, tuple[str, str]] = {  # name -> (subject, body)
    "welcome": ("Welcome, $name", "Hi $name, your account is ready."),
    "enrolled": ("Enrolled in $course", "Hi $name, you are enrolled in $course. See you in class!"),
    "receipt": ("Receipt $payment", "We received $amount for $course. Reference: $payment."),
}


class NotificationRequest(BaseModel):
    recipient: str = Field(pattern=r"^[^@\s]+@[^@\s]+\.[a-z]{2,}$")
    template: str
    channel: Literal["email", "sms", "push"] = "email"
    variables: dict[str, str] = {}


class Notification(BaseModel):
    id: int
    recipient: str
    channel: str
    subject: str
    body: str


_outbox: list[Notification] = []
_ids = itertools.count(1)

router = APIRouter(prefix="/notifications", tags=["notifications"])


def render(template: str, variables: dict[str, str]) -> tuple[str, str]:
    if template not in TEMPLATES:
        raise HTTPException(status_code=404, detail=f"no template {template!r}")
    try:
        subject, body = (Template(part).substitute(variables) for part in TEMPLATES[template])
    except KeyError as exc:
        raise HTTPException(status_code=422, detail=f"missing variable {exc.args[0]}") from None
    return subject, body


@router.post("", status_code=status.HTTP_202_ACCEPTED)
def send(request: NotificationRequest) -> Notification:
    subject, body = render(request.template, request.variables)
    note = Notification(
        id=next(_ids),
        recipient=request.recipient,
        channel=request.channel,
        subject=subject,
        body=body,
    )
    _outbox.append(note)
    return note


@router.get("")
def outbox(recipient: str) -> list[Notification]:
    return [n for n in _outbox if n.recipient == recipient]


app = create_app("notification", routers=[router])

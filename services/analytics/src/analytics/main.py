"""Analytics: ingest learning events, report per-event statistics."""

from __future__ import annotations

import statistics
from datetime import UTC, datetime

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, Field
from servicekit import create_app


class Event(BaseModel):
    name: str = Field(pattern=r"^[a-z][a-z0-9_.]{1,63}$")
    user: str = Field(min_length=1)
    value: float = 1.0
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class Stats(BaseModel):
    name: str
    count: int
    users: int
    total: float
    mean: float
    p95: float


_events: dict[str, list[Event]] = {}

router = APIRouter(tags=["analytics"])


@router.post("/events", status_code=status.HTTP_202_ACCEPTED)
def ingest(events: list[Event]) -> dict[str, int]:
    """Batch ingest: all or nothing (validation happens before anything is stored)."""
    if not 1 <= len(events) <= 500:
        raise HTTPException(status_code=422, detail="send 1 to 500 events per batch")
    for event in events:
        _events.setdefault(event.name, []).append(event)
    return {"accepted": len(events)}


@router.get("/stats/{name}")
def stats(name: str) -> Stats:
    events = _events.get(name)
    if not events:
        raise HTTPException(status_code=404, detail=f"no events named {name!r}")
    values = sorted(e.value for e in events)
    p95 = values[0] if len(values) == 1 else statistics.quantiles(values, n=20)[-1]
    return Stats(
        name=name,
        count=len(values),
        users=len({e.user for e in events}),
        total=sum(values),
        mean=statistics.fmean(values),
        p95=p95,
    )


app = create_app("analytics", routers=[router])

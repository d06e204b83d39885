"""Payments: validate amount and currency, idempotent on the Idempotency-Key header."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Annotated, Literal

from authn import CurrentUser
from fastapi import APIRouter, Header, HTTPException, status
from pydantic import BaseModel, Field, field_validator
from servicekit import create_app

# ISO 4217 minor units: KRW has none, USD and EUR have cents.
MINOR_UNITS = {"KRW": 0, "USD": 2, "EUR": 2}
MAX_AMOUNT = {"KRW": Decimal(10_000_000), "USD": Decimal(10_000), "EUR": Decimal(10_000)}


class PaymentRequest(BaseModel):
    course: str = Field(min_length=1)
    amount: Decimal = Field(gt=0)
    currency: Literal["KRW", "USD", "EUR"]

    @field_validator("amount")
    @classmethod
    def finite(cls, value: Decimal) -> Decimal:
        if not value.is_finite():
            raise ValueError("amount must be a finite number")
        return value


class Payment(PaymentRequest):
    id: str
    payer: str
    status: Literal["captured"] = "captured"


_payments: dict[str, Payment] = {}
_by_key: dict[tuple[str, str], str] = {}

router = APIRouter(prefix="/payments", tags=["payments"])


def check_amount(amount: Decimal, currency: str) -> None:
    exponent = amount.normalize().as_tuple().exponent
    decimals = -exponent if isinstance(exponent, int) and exponent < 0 else 0
    if decimals > MINOR_UNITS[currency]:
        raise HTTPException(422, f"{currency} allows {MINOR_UNITS[currency]} decimal places")
    if amount > MAX_AMOUNT[currency]:
        raise HTTPException(422, f"amount exceeds {MAX_AMOUNT[currency]} {currency}")


@router.post("", status_code=status.HTTP_201_CREATED)
def pay(
    request: PaymentRequest,
    user: CurrentUser,
    idempotency_key: Annotated[str, Header(min_length=8, max_length=64)],
) -> Payment:
    """A retried request with the same key returns the first payment, not a second charge."""
    known = _by_key.get((user.subject, idempotency_key))
    if known is not None:
        return _payments[known]
    check_amount(request.amount, request.currency)
    payment = Payment(id=str(uuid.uuid4()), payer=user.subject, **request.model_dump())
    _payments[payment.id] = payment
    _by_key[(user.subject, idempotency_key)] = payment.id
    return payment


@router.get("/{payment_id}")
def get_payment(payment_id: str, user: CurrentUser) -> Payment:
    payment = _payments.get(payment_id)
    if payment is None or payment.payer != user.subject:
        raise HTTPException(status_code=404, detail="no such payment")
    return payment


app = create_app("payment", routers=[router])

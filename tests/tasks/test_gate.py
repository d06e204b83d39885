"""The gate's re-check: a release approved while the environment changed is refused."""

from __future__ import annotations

import pytest

from core.errors import PromotionRefused
from core.records import ImageRef, PlannedChange, PromotionPlan, make_plan
from tasks.gate import check_unchanged


def _plan(current: str | None, new: str) -> PromotionPlan:
    image = ImageRef(service="auth", repository="r/auth", digest="sha256:" + new * 64)
    change = PlannedChange(service="auth", current_digest=current, image=image)
    return make_plan("production", "staging", [change], "alice")


def test_an_unchanged_environment_passes_and_a_changed_one_is_refused() -> None:
    approved = _plan(None, "a")
    check_unchanged(approved, _plan(None, "a"))
    with pytest.raises(PromotionRefused, match="changed while release"):
        check_unchanged(approved, _plan("sha256:" + "b" * 64, "a"))

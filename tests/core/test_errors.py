"""The error hierarchy: every class drawn at its top, none a ValueError or KeyError, and
the ones carrying data survive pickling (Prefect pickles a failed run's exception)."""

from __future__ import annotations

import inspect
import pickle

import core.errors
from core.errors import (
    CiFailed,
    EnvironmentUnhealthy,
    PipelineError,
    PromotionRejected,
    PromotionRolledBack,
    SlackRequestRefused,
    SlackUserUnknown,
)
from core.records import (
    CiOutcome,
    HealthReport,
    HealthResult,
    ImageRef,
    PlannedChange,
    StageResult,
    make_plan,
)

ERRORS = [
    value
    for value in vars(core.errors).values()
    if inspect.isclass(value) and issubclass(value, Exception)
]


def test_every_error_is_drawn_in_the_tree_and_below_pipeline_error() -> None:
    tree = core.errors.__doc__ or ""
    assert len(ERRORS) > 30
    for error in ERRORS:
        assert issubclass(error, PipelineError), error
        assert not issubclass(error, ValueError | KeyError), error
        assert f" {error.__name__} " in tree or f"{error.__name__}\n" in tree, error.__name__


def test_errors_with_typed_payloads_survive_pickling() -> None:
    image = ImageRef(service="auth", repository="r/auth", digest="sha256:" + "a" * 64)
    change = PlannedChange(service="auth", current_digest=None, image=image)
    plan = make_plan("staging", "dev", [change], "alice")
    ruff = StageResult(service="auth", stage="ruff", status="failed", summary="F401")
    outcome = CiOutcome(commit="c" * 40, affected=["auth"], results=[ruff], failed={"auth": "x"})
    report = HealthReport(
        environment="dev",
        results=[HealthResult(service="auth", url="http://x", ok=False, attempts=1, seconds=1)],
    )
    for error in (
        PromotionRejected("no", plan=plan),
        PromotionRolledBack("back", failed="auth", restored={"auth": None}, plan=plan),
        EnvironmentUnhealthy("sick", report),
        CiFailed("CI failed for 1 of 1 services: auth: ruff failed: F401", outcome),
    ):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error)
        assert str(again) == str(error)
        assert vars(again) == vars(error)
    assert SlackUserUnknown.status == 403
    assert issubclass(SlackUserUnknown, SlackRequestRefused)

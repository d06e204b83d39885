"""The analysis policy (core/analysis.py) and its measurements (tasks/analysis.py) against a
real Prometheus configured like the stack's (tests/prometheus.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from blocks.approvals import parse_policy
from blocks.environments import EnvironmentSpec
from blocks.stack import StackInfo, save_stack_info
from core.analysis import AnalysisCheck, AnalysisPolicy, CheckResult, Limit, limit_of, overall
from core.errors import ConfigError
from stack.ports import free_port
from tasks.analysis import NO_PROMETHEUS, AnalysisRun, analysis_of, measure, run_checks
from tests.prometheus import running_prometheus

ENV = EnvironmentSpec(
    name="an-unit",
    namespace="an-unit",
    replicas={"min": 1, "max": 1},
    log_level="INFO",
    storage="minio",
    local_port_offset=0,
)


def _policy_error(analysis: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_policy(yaml.safe_dump({"analysis": {"staging": analysis}}))
    return str(caught.value)


CHECK = {"name": "errors", "query": "vector(0)", "below": 0.01}


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_prometheus(tmp_path_factory.mktemp("prometheus")) as url:
        yield url


# --- the policy -------------------------------------------------------------------------


def test_a_policy_reads_from_the_approval_policy_beside_the_deploy_windows() -> None:
    text = yaml.safe_dump(
        {
            "analysis": {
                "staging": {
                    "checks": [CHECK | {"query": 'up{service="$service"}'}],
                    "bake_s": 5,
                    "interval_s": 2,
                    "count": 3,
                    "failure_limit": 1,
                }
            }
        }
    )
    analysis = parse_policy(text).analysis["staging"]
    assert (analysis.bake_s, analysis.interval_s, analysis.count, analysis.failure_limit) == (
        5,
        2,
        3,
        1,
    )
    values = {"service": "course", "environment": "staging", "digest": "sha256:ab"}
    assert analysis.checks[0].render(values) == 'up{service="course"}'
    assert analysis.inconclusive == "fail"


@pytest.mark.parametrize(
    ("analysis", "named"),
    [
        ({"checks": [CHECK], "inconclusive": "approve"}, "analysis.staging.inconclusive"),
        ({"checks": [CHECK], "inconclusive": "pass"}, "analysis.staging.inconclusive"),
        ({"checks": [CHECK | {"query": "up{x='$pod'}"}]}, "analysis.staging.checks.0.query"),
        ({"checks": [{"name": "x", "query": "up"}]}, "has no condition"),
        ({"checks": [CHECK], "count": 2, "failure_limit": 2}, "failure_limit 2 must be below"),
        ({"checks": [CHECK, CHECK]}, "check names must be unique: errors"),
        ({"checks": []}, "analysis.staging.checks"),
        ({"checks": [CHECK], "interval_s": 0}, "analysis.staging.interval_s"),
        ({"checks": [CHECK], "bake": 3}, "analysis.staging.bake"),
    ],
)
def test_a_bad_policy_is_refused_naming_the_field(analysis: dict[str, Any], named: str) -> None:
    assert named in _policy_error(analysis)


def test_asking_for_an_approval_when_inconclusive_is_refused_clearly() -> None:
    assert "'approve' (ask for an approval" in _policy_error(
        {"checks": [CHECK], "inconclusive": "approve"}
    )


def test_an_environment_cannot_carry_its_own_analysis_in_the_pipeline_config() -> None:
    with pytest.raises(ValueError, match="analysis: the approval policy is not part"):
        EnvironmentSpec.model_validate(ENV.model_dump() | {"analysis": {}})


# --- judging ---------------------------------------------------------------------------


def test_a_relative_limit_follows_the_previous_release_and_caps_the_absolute_one() -> None:
    check = AnalysisCheck(name="p99", query="up", below=2.0, below_previous=1.2)
    assert limit_of(check, 0.5).below == pytest.approx(0.6)
    assert limit_of(check, 10.0).below == 2.0
    assert limit_of(check, None).below == 2.0
    with pytest.raises(ValueError, match="below_previous needs an absolute `below`"):
        AnalysisCheck(name="p99", query="up", below_previous=1.2)


def test_verdicts_need_enough_good_measurements_and_no_data_never_passes() -> None:
    policy = AnalysisPolicy(checks=(AnalysisCheck(**CHECK),), count=3, failure_limit=1)
    empty = CheckResult(service="s", check="errors", query="q", limit=Limit(below=0.01))
    assert empty.verdict(policy) is None
    assert empty.with_value(0.5).verdict(policy) is None  # one failure is allowed
    assert empty.with_value(0.5).with_value(0.5).verdict(policy) == "failed"
    assert empty.with_value(0.0).with_value(0.0).verdict(policy) == "passed"
    no_data = empty.with_value(None, "no data").with_value(None, "no data")
    assert no_data.verdict(policy) == "inconclusive"
    assert overall([no_data], policy) == "inconclusive"
    assert overall([no_data, empty.with_value(1).with_value(1)], policy) == "failed"
    assert not Limit(below=1).met(float("nan"))


# --- measuring -------------------------------------------------------------------------


def test_measure_reads_one_value_and_names_why_there_is_none(prometheus: str) -> None:
    assert measure(prometheus, "vector(0.25)") == (0.25, "")
    assert measure(prometheus, "scalar(vector(2))") == (2.0, "")
    value, why = measure(prometheus, 'nothing_here{service="course"}')
    assert value is None
    assert why.startswith("no data")
    value, why = measure(prometheus, "vector(1) or label_replace(vector(2), 'a', 'b', '', '')")
    assert value is None
    assert "2 series" in why
    value, why = measure(prometheus, "vector(0) / vector(0)")
    assert value is None
    assert why.startswith("no data: NaN")
    value, why = measure(prometheus, "sum(")
    assert value is None
    assert "answered 400" in why
    closed = f"http://127.0.0.1:{free_port()}"
    value, why = measure(closed, "vector(1)")
    assert value is None
    assert f"Prometheus at {closed} did not answer" in why
    assert measure(None, "vector(1)") == (None, NO_PROMETHEUS)


def _run(url: str | None, query: str, **policy: Any) -> AnalysisRun:
    check = AnalysisCheck(name="ratio", query=query, below=0.1)
    return AnalysisRun("an-unit", AnalysisPolicy(checks=(check,), **policy), url)


def _results(run: AnalysisRun) -> CheckResult:
    limit = limit_of(run.policy.checks[0], None)
    waits: list[float] = []
    (result,) = run_checks(
        run,
        [CheckResult(service="s", check="ratio", query=run.policy.checks[0].query, limit=limit)],
        sleep=waits.append,
    )
    assert waits[0] == run.policy.bake_s
    assert all(w == run.policy.interval_s for w in waits[1:])
    return result


def test_a_failing_check_stops_once_it_exceeds_its_failure_limit(prometheus: str) -> None:
    run = _run(prometheus, "vector(0.5)", count=5, failure_limit=1, bake_s=3, interval_s=2)
    result = _results(run)
    assert result.values == (0.5, 0.5)
    assert result.verdict(run.policy) == "failed"
    assert "measured 0.5, 0.5 (limit < 0.1; 2 failed, 1 allowed" in result.summary(run.policy)


def test_a_healthy_check_passes_after_its_count(prometheus: str) -> None:
    run = _run(prometheus, "vector(0.01)", count=3)
    result = _results(run)
    assert result.values == (0.01, 0.01, 0.01)
    assert result.verdict(run.policy) == "passed"


def test_prometheus_unreachable_is_inconclusive_never_passed() -> None:
    run = _run(f"http://127.0.0.1:{free_port()}", "vector(0)", count=3, failure_limit=1)
    result = _results(run)
    assert result.values == (None, None)  # two without data: three good ones are impossible
    assert result.verdict(run.policy) == "inconclusive"
    assert "did not answer" in result.summary(run.policy)


def test_the_environment_names_its_prometheus_else_the_stack_records_one(tmp_path: Path) -> None:
    policy = parse_policy(yaml.safe_dump({"analysis": {ENV.name: {"checks": [CHECK]}}}))
    assert analysis_of(policy, ENV, tmp_path) == AnalysisRun(
        ENV.name, policy.analysis[ENV.name], None
    )
    info = StackInfo(docker_host="unix:///x", registry="127.0.0.1:1", base_image="b")
    save_stack_info(info.model_copy(update={"prometheus_url": "http://127.0.0.1:9"}), tmp_path)
    found = analysis_of(policy, ENV, tmp_path)
    assert found is not None
    assert found.prometheus_url == "http://127.0.0.1:9"
    own = ENV.model_copy(update={"prometheus_url": "http://127.0.0.1:8"})
    found = analysis_of(policy, own, tmp_path)
    assert found is not None
    assert found.prometheus_url == "http://127.0.0.1:8"
    assert analysis_of(parse_policy("{}"), ENV, tmp_path) is None

"""From an approval to the first deploy: how long a paused promotion takes to act on a
signed approval (issue 12, item 7: at most 3 s).

    uv run python bench/approval_bench.py [N] [RUNS]

As `promotion_bench.py` sets up (the local stack, one real image standing in for N
services, a temporary Prefect server), plus an approval policy in a temporary git
repository (the way `config/approvals.yaml` is read from the protected branch) that
gates the environment `pb-gate`, with SSH keys for a promoter and an approver.

Each run promotes a release into `pb-gate` from a thread (the request signed by the
promoter), waits for the run to pause at its gate, and submits the approver's signed
answer as `cicd approve` makes it. Printed, from the server's own records: answer ->
the run Running again, and answer -> the first `deploy-*` task run's start. Releases
alternate, so every run deploys. Medians over RUNS.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import (  # noqa: E402
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import StateType  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from bench import promotion_bench as pb  # noqa: E402  (scratch dirs and settings first)
from core.trust import TRUST_FILE_ENV  # noqa: E402
from flows.promotion import promote  # noqa: E402
from tasks.approval import submit_answer  # noqa: E402
from tests.approvers import Approvers, paused_promotion  # noqa: E402  (keys, a policy repo)
from tests.trust import trust_file_for  # noqa: E402

GATE = "pb-gate"


def write_config(services: list[tuple[str, int]]) -> str:
    """pb-dev -> pb-gate, the first N services."""
    path = Path(pb.write_config(services))
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["environments"] = [
        data["environments"][0],
        {**data["environments"][1], "name": GATE, "namespace": GATE},
    ]
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def one_run(cfg_path: str, people: Approvers, seen: set[UUID]) -> tuple[float, float]:
    done: list[Any] = []
    request = people.request(GATE, "alice")
    job = threading.Thread(
        target=lambda: done.append(
            promote(environment=GATE, config_source=cfg_path, return_state=True, **request)
        )
    )
    job.start()
    run_id = paused_promotion(seen)
    seen.add(run_id)
    answer = people.answer(run_id, "bob")
    answered = datetime.now(UTC)
    submit_answer(run_id, answer)
    job.join(600)
    state = done[0]
    if not state.is_completed():
        msg = f"the promotion did not complete: {state.message}"
        raise RuntimeError(msg)
    with get_client(sync_client=True) as client:
        states = client.read_flow_run_states(run_id)
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )
    running = min(
        s.timestamp for s in states if s.type == StateType.RUNNING and s.timestamp > answered
    )
    deploys = [t.start_time for t in tasks if t.name.startswith("deploy_release-") and t.start_time]
    if os.environ.get("BENCH_VERBOSE"):
        for t in sorted(tasks, key=lambda t: t.start_time or answered):
            if t.start_time and answered < t.start_time <= min(deploys):
                took = (t.end_time - t.start_time).total_seconds() if t.end_time else -1
                after = (t.start_time - answered).total_seconds()
                print(f"    +{after:5.2f}s {t.name} {took:.2f}s")
    return (running - answered).total_seconds(), (min(deploys) - answered).total_seconds()


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    cfg_path, cfg, stack, client, registry = pb.set_up(count, write_config)
    print(f"{count} services, {os.cpu_count()} cores, {runs} runs")
    resumed: list[float] = []
    deployed: list[float] = []
    try:
        with prefect_test_harness(server_startup_timeout=300):
            people = Approvers(pb._SCRATCH / "approvers", ["alice", "bob"])
            people.set_policy({GATE: {"approvers": ["bob"], "timeout_s": 600}})
            pinned = trust_file_for(people.bare.parent, people.bare, environments=(pb.SOURCE, GATE))
            os.environ[TRUST_FILE_ENV] = str(pinned)
            first = pb.image(stack.docker_host, registry, stack.base_image)
            releases = [first, pb.variant(client, first)]
            for env in (pb.SOURCE, GATE):
                pb.clear(client, cfg, env)
            seen: set[UUID] = set()
            for n in range(runs):
                pb.seed(cfg, pb.SOURCE, releases[n % 2])
                to_running, to_deploy = one_run(cfg_path, people, seen)
                resumed.append(to_running)
                deployed.append(to_deploy)
                print(
                    f"  run {n + 1}: answer -> running {to_running:.2f}s, "
                    f"-> first deploy {to_deploy:.2f}s"
                )
    finally:
        for env in (pb.SOURCE, GATE):
            pb.clear(client, cfg, env)
        client.close()
    print(
        f"median: answer -> running {statistics.median(resumed):.2f}s, "
        f"answer -> first deploy {statistics.median(deployed):.2f}s (target 3 s)"
    )


if __name__ == "__main__":
    main()

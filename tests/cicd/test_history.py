"""`cicd history ENV`, `cicd rollback ENV --to`, `cicd override-freeze`, as a person runs them.

The ledger is written the way CI writes it, naming real images of the stack's registry and
commits of a pinned repository; nothing is deployed (history only reads). Own environments
hs-dev -> hs-stg.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest
from prefect.filesystems import LocalFileSystem
from typer.testing import CliRunner

from blocks.approvals import ApprovalPolicy
from blocks.stack import StackInfo
from cicd.cli import app
from core.errors import PromotionRefused
from core.records import ImageRef
from core.windows import DeployWindows, parse_clock
from tasks.freeze import check_deploy_window
from tasks.history import judge_releases, ledger_releases
from tasks.releases import EnvironmentState, ReleaseRecord, with_deploy
from tests.approvers import Approvers
from tests.flows.chain import SERVICES, as_service, derive, protected_tip, write_chain_config
from tests.ledgers import current_ledger
from tests.trust import pin_repository

runner = CliRunner()
DEV, STG = "hs-dev", "hs-stg"


@dataclass(frozen=True)
class Recorded:
    cfg_path: str
    people: Approvers
    old: str
    gone: str
    now: str


def _record(release: str, image: ImageRef, commit: str) -> None:
    ledger = current_ledger()
    for service in SERVICES:
        ledger.record_deploy(
            STG,
            ReleaseRecord(
                service=service,
                environment=STG,
                image=as_service(image, service),
                release_id=release,
                verified=True,
                ref="refs/heads/main",
                commit=commit,
            ),
        )


@pytest.fixture(scope="module")
def recorded(
    tmp_path_factory: pytest.TempPathFactory,
    stack: StackInfo,
    docker_client: docker.DockerClient,
    pushed_image: ImageRef,
) -> Iterator[Recorded]:
    """hs-stg's ledger: `old` (the pushed image), then `gone` (a digest the registry never
    held), then `now` (an image derived from it, serving)."""
    mp = pytest.MonkeyPatch()
    folder = tmp_path_factory.mktemp("history")
    cfg_path = write_chain_config(folder / "pipeline.yaml", [(DEV, 30100), (STG, 30600)])
    people = Approvers(folder, ["alice", "bob"])
    people.set_policy({})
    pin_repository(mp, folder, people.bare, environments=(DEV, STG))
    tip = protected_tip()
    suffix = uuid.uuid4().hex[:6]
    old, gone, now = f"old-{suffix}", f"gone-{suffix}", f"now-{suffix}"
    missing = pushed_image.model_copy(update={"digest": f"sha256:{uuid.uuid4().hex * 2}"})
    _record(old, pushed_image, tip)
    _record(gone, missing, tip)
    _record(now, derive(docker_client, pushed_image, "history-now"), tip)
    yield Recorded(cfg_path, people, old, gone, now)
    mp.undo()


def test_history_lists_releases_newest_first_with_verdicts(recorded: Recorded) -> None:
    result = runner.invoke(app, ["history", STG, "--config", recorded.cfg_path, "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    ids = [r["release"]["release_id"] for r in rows]
    assert ids.index(recorded.now) < ids.index(recorded.gone) < ids.index(recorded.old)
    by_id = {r["release"]["release_id"]: r for r in rows}
    assert by_id[recorded.now]["serving"] == SERVICES
    assert by_id[recorded.now]["returnable"] is False
    assert by_id[recorded.old]["serving"] == []
    assert by_id[recorded.old]["returnable"] is True
    assert by_id[recorded.old]["problems"] == []
    assert by_id[recorded.gone]["returnable"] is False
    assert any("course: image gone" in p for p in by_id[recorded.gone]["problems"])
    table = runner.invoke(app, ["history", STG, "--config", recorded.cfg_path])
    assert table.exit_code == 0, table.output
    assert recorded.gone in table.output
    assert "image gone" in table.output
    assert "serving" in table.output


def test_history_of_an_unknown_environment_is_refused() -> None:
    result = runner.invoke(app, ["history", "qa"])
    assert result.exit_code == 2
    assert "unknown environment 'qa'" in result.output


def test_rollback_to_an_unknown_release_fails_naming_it(recorded: Recorded) -> None:
    before = current_ledger().current(STG).revision
    result = runner.invoke(
        app, ["rollback", STG, "--config", recorded.cfg_path, "--to", "nope-123", "-v"]
    )
    assert result.exit_code == 1, result.output
    assert "release 'nope-123' is not in the ledger of hs-stg" in result.output
    assert current_ledger().current(STG).revision == before


def test_override_freeze_prints_what_the_gate_accepts(
    recorded: Recorded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two approvers' `cicd override-freeze` output, as files, is what the freeze check
    takes (the drill's clock, ELICE_CLOCK, is the signing time)."""
    monkeypatch.setenv("ELICE_CLOCK", "2026-12-24T10:00:00+09:00")
    signed = []
    for who in ("alice", "bob"):
        key = str(recorded.people.keys[who])
        args = ["override-freeze", STG, "--release", "r9", "--reason", "fix", "--key", key]
        result = runner.invoke(app, [*args, "--as", who])
        assert result.exit_code == 0, result.output
        signed.append(json.loads(result.output))
    windows = DeployWindows(
        freezes=[{"start": "2026-12-24", "end": "2026-12-24", "reason": "eve"}],
        override_approvers=("alice", "bob"),
    )
    policy = ApprovalPolicy(
        allowed_signers=recorded.people.allowed_signers, deploy_windows={STG: windows}
    )
    store = LocalFileSystem(basepath=str(tmp_path / "ledger"))
    at = parse_clock("2026-12-24T10:00:00+09:00")
    done = check_deploy_window.fn(policy, STG, at, signed, lambda: "r9", (store, "run-cli"))
    assert done is not None
    freeze, release = done
    assert (freeze.reason, release) == ("eve", "r9")
    with pytest.raises(PromotionRefused, match="valid: alice"):
        check_deploy_window.fn(policy, STG, at, signed[:1], lambda: "r9", (store, "run-1"))


def test_override_freeze_needs_a_reason() -> None:
    result = runner.invoke(
        app, ["override-freeze", STG, "--release", "r9", "--reason", " ", "--key", "/nonexistent"]
    )
    assert result.exit_code == 2
    assert "--reason must say why" in result.output


# --- the verdicts, from ledger revisions alone -------------------------------------------


def _image(service: str, n: int) -> ImageRef:
    return ImageRef(
        service=service,
        repository=f"127.0.0.1:5000/elice/{service}",
        digest=f"sha256:{n:064x}",
        version=f"v{n}",
        commit="c" * 40,
    )


def _states(*releases: tuple[str, int, bool]) -> list[EnvironmentState]:
    """Revisions recording, in order, each (release id, image number, verified)."""
    state = EnvironmentState(environment=STG)
    states = []
    for revision, (release, n, verified) in enumerate(releases, start=1):
        for service in SERVICES:
            record = ReleaseRecord(
                service=service,
                environment=STG,
                image=_image(service, n),
                release_id=release,
                verified=verified,
                commit=f"{n:040x}",
            )
            state = with_deploy(state, record)
        state = state.model_copy(update={"revision": revision})
        states.append(state)
    return states


def test_releases_are_judged_from_the_revisions() -> None:
    states = _states(("a", 1, True), ("b", 2, False), ("c", 3, True), ("d", 4, True))
    releases = ledger_releases(states)
    assert [r.release_id for r in releases] == ["d", "c", "b", "a"]
    unreviewed = {f"{3:040x}": f"commit {3:040x} is not on main"}
    gone = {("course-b", _image("course-b", 1).digest)}
    judged = judge_releases(
        releases,
        states[-1],
        SERVICES,
        unreviewed,
        lambda r: "course-b: image gone" if (r.service, r.image.digest) in gone else None,
    )
    by_id = {s.release.release_id: s for s in judged}
    assert by_id["d"].serving == SERVICES
    assert not by_id["d"].returnable
    assert by_id["c"].problems == [f"{s}: commit {3:040x} is not on main" for s in SERVICES]
    assert by_id["b"].problems == [f"{s}: never verified in {STG}" for s in SERVICES]
    assert by_id["a"].problems == ["course-b: image gone"]
    only_course = judge_releases(releases, states[-1], ["course"], {}, lambda r: None)
    assert "course-b: no longer in the configuration" in only_course[-1].problems

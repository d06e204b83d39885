"""People with SSH keys, and a repository whose protected branch holds their approval policy.

`Approvers(root, names)` makes one real ed25519 key per name (`ssh-keygen`), and a
bare git repository with `config/approvals.yaml` committed on `main`; `set_policy`
commits a new policy there, as a reviewed pull request would. `request` and `answer`
sign what `cicd promote --key` and `cicd approve --key` sign.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType

from blocks.repository import GitRepository
from tasks.approval import Decision, answer_for, read_gate, sign_request


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(cwd), *args],
        capture_output=True,
        text=True,
        check=True,
        env={
            "GIT_AUTHOR_NAME": "policy",
            "GIT_AUTHOR_EMAIL": "policy@example.invalid",
            "GIT_COMMITTER_NAME": "policy",
            "GIT_COMMITTER_EMAIL": "policy@example.invalid",
            "PATH": "/usr/bin:/bin",
        },
    )
    return done.stdout


class Approvers:
    """Keys for `names`, and the policy repository."""

    def __init__(self, root: Path, names: list[str]) -> None:
        self.root = root
        self.keys: dict[str, Path] = {}
        lines = []
        for name in names:
            key = root / "keys" / name
            key.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)],
                check=True,
            )
            self.keys[name] = key
            kind, blob = key.with_suffix(".pub").read_text().split()[:2]
            lines.append(f"{name} {kind} {blob}")
        self.allowed_signers = "\n".join(lines) + "\n"
        self.bare = root / "policy.git"
        self.work = root / "policy-work"
        _git(root, "init", "-q", "--bare", "-b", "main", str(self.bare))
        _git(root, "init", "-q", "-b", "main", str(self.work))
        _git(self.work, "remote", "add", "origin", str(self.bare))

    @property
    def repository(self) -> GitRepository:
        """The policy repository, as a trust file pins it."""
        return GitRepository(url=str(self.bare), name="elice/monorepo")

    def set_policy(self, environments: dict[str, Any], **extra: Any) -> None:
        """Commit `config/approvals.yaml` with these gates to `main` and push it."""
        policy = {"environments": environments, "allowed_signers": self.allowed_signers, **extra}
        path = self.work / "config" / "approvals.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(policy), encoding="utf-8")
        _git(self.work, "add", "-A")
        _git(self.work, "commit", "-q", "--allow-empty", "-m", "approval policy")
        _git(self.work, "push", "-q", "origin", "main")

    def request(
        self, environment: str, name: str, services: list[str] | None = None
    ) -> dict[str, str]:
        """The flow parameters of a promotion requested (and signed) by `name`."""
        request, signature = sign_request(environment, services, name, self.keys[name])
        return {"promoted_by": name, "request": request, "request_signature": signature}

    def answer(
        self, run_id: UUID, name: str, decision: Decision = "approve", reason: str = ""
    ) -> dict[str, str]:
        """The run input of `name`'s signed decision about the paused run."""
        run_input, _, _ = answer_for(run_id, self.keys[name], name, decision, reason)
        return run_input


def paused_promotion(not_in: set[UUID], timeout: float = 120) -> UUID:
    """The promote run paused at its gate with its form saved, not one of `not_in`.

    Raises:
        AssertionError: none within `timeout` seconds.
    """
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["promote"])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
                ),
            )
        for found in runs:
            if found.id not in not_in:
                try:
                    read_gate(found.id)
                except Exception:
                    continue
                return found.id
        time.sleep(0.2)
    msg = "no promote run paused at its gate"
    raise AssertionError(msg)

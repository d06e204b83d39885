"""The commit under test: real git, a bare remote, pushes after the mirror exists, HTTP auth."""

from __future__ import annotations

import base64
import http.server
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest
from pydantic import SecretStr

from blocks.repository import GitRepository
from core.errors import SourceError, ToolError, UnreviewedCommit
from tasks.workspace import (
    git_env,
    mirror_path,
    prepare_workspace,
    remove_workspace,
    unreviewed_commits,
    use_checkout,
    verify_reviewed,
)
from tests.tasks.ci_checkout import bare_remote, commit_all, git, push_commit

TOKEN = "s3cret-token-value"


@pytest.fixture
def remote(tmp_path: Path) -> tuple[Path, Path]:
    """A bare remote and a clone to push from; main has one commit."""
    return bare_remote(tmp_path)


def test_a_workspace_holds_exactly_the_commit_and_is_removed(remote: tuple[Path, Path]) -> None:
    bare, clone = remote
    first = git(clone, "rev-parse", "HEAD").strip()
    second = push_commit(clone, "a.txt", "two\n")
    repository = GitRepository(url=str(bare), name="elice/monorepo")

    ws = prepare_workspace.fn(repository, first, "refs/heads/main")
    assert ws.commit == first
    assert (Path(ws.path) / "a.txt").read_text() == "one\n"
    assert ws.protected
    assert ws.repository == "elice/monorepo"
    remove_workspace.fn(ws)
    assert not Path(ws.path).exists()
    listed = git(Path(ws.mirror), "worktree", "list", "--porcelain")
    assert ws.path not in listed

    tip = prepare_workspace.fn(repository, "HEAD")
    assert tip.commit == second
    assert tip.ref == "refs/heads/main"
    remove_workspace.fn(tip)


def test_the_tip_is_fetched_anew_for_each_run(remote: tuple[Path, Path]) -> None:
    bare, clone = remote
    repository = GitRepository(url=str(bare))
    before = prepare_workspace.fn(repository, "HEAD")
    remove_workspace.fn(before)
    pushed_later = push_commit(clone, "b.txt", "later\n")  # after the mirror exists
    after = prepare_workspace.fn(repository, "HEAD")
    assert after.commit == pushed_later != before.commit
    assert (Path(after.path) / "b.txt").exists()
    remove_workspace.fn(after)


def test_a_commit_off_the_protected_branch_does_not_ship(remote: tuple[Path, Path]) -> None:
    bare, clone = remote
    git(clone, "checkout", "-q", "-b", "feature")
    feature = push_commit(clone, "f.txt", "pull request\n", branch="feature")
    repository = GitRepository(url=str(bare))
    ws = prepare_workspace.fn(repository, feature, "refs/pull/7/merge")
    assert ws.commit == feature
    assert not ws.protected
    assert ws.ref == "refs/pull/7/merge"
    remove_workspace.fn(ws)
    # once merged into main, the same commit is on the protected branch
    git(clone, "push", "-q", "origin", "feature:refs/heads/main")
    merged = prepare_workspace.fn(repository, feature)
    assert merged.protected
    remove_workspace.fn(merged)


def test_an_unknown_commit_is_named(remote: tuple[Path, Path]) -> None:
    bare, _ = remote
    with pytest.raises(SourceError, match="'" + "f" * 40 + "' is not a commit"):
        prepare_workspace.fn(GitRepository(url=str(bare)), "f" * 40)
    with pytest.raises(SourceError, match="'no-such-branch' is not a commit"):
        prepare_workspace.fn(GitRepository(url=str(bare)), "no-such-branch")


def test_concurrent_runs_never_share_a_worktree(remote: tuple[Path, Path]) -> None:
    bare, clone = remote
    first = git(clone, "rev-parse", "HEAD").strip()
    second = push_commit(clone, "a.txt", "two\n")
    repository = GitRepository(url=str(bare))
    with ThreadPoolExecutor(max_workers=4) as pool:
        spaces = list(
            pool.map(lambda sha: prepare_workspace.fn(repository, sha), [first, second] * 2)
        )
    assert len({ws.path for ws in spaces}) == 4
    for ws in spaces:
        text = (Path(ws.path) / "a.txt").read_text()
        assert text == ("one\n" if ws.commit == first else "two\n")
    for ws in spaces:
        remove_workspace.fn(ws)
    assert not any((mirror_path(repository).parent.parent / "workspaces").glob("*/a.txt"))


def test_a_checkout_is_judged_by_the_pinned_branch_never_its_own(
    remote: tuple[Path, Path], tmp_path: Path
) -> None:
    bare, clone = remote
    repository = GitRepository(url=str(bare), name="elice/monorepo")
    (clone / "a.txt").write_text("unpushed\n")
    local = commit_all(clone, "on the checkout's own main only")
    assert git(clone, "rev-parse", "refs/heads/main").strip() == local
    ws = use_checkout.fn(repository, str(clone))
    assert ws.commit == local
    assert not ws.protected  # its own main says yes; the pinned repository has no such commit
    git(clone, "push", "-q", "origin", "main")
    assert use_checkout.fn(repository, str(clone)).protected  # pushed: fetched afresh, on main
    # another repository altogether, whose own main holds only what its owner committed
    other = tmp_path / "other"
    git(tmp_path, "init", "-q", "-b", "main", str(other))
    (other / "a.txt").write_text("not reviewed\n")
    stranger = commit_all(other, "nobody reviewed this")
    ws = use_checkout.fn(repository, str(other))
    assert (ws.commit, ws.protected) == (stranger, False)
    # a pinned repository that cannot be fetched says nothing: checks and images only
    gone = GitRepository(url=str(tmp_path / "gone.git"))
    assert not use_checkout.fn(gone, str(clone)).protected


def test_a_commit_is_reviewed_only_while_the_protected_branch_reaches_it(
    remote: tuple[Path, Path],
) -> None:
    bare, clone = remote
    repository = GitRepository(url=str(bare), name="elice/monorepo")
    base = git(clone, "rev-parse", "HEAD").strip()
    merged = push_commit(clone, "b.txt", "merged\n")
    verify_reviewed(repository, merged)
    verify_reviewed(repository, base)
    git(clone, "checkout", "-q", "-b", "feature")
    feature = push_commit(clone, "f.txt", "pull request\n", branch="feature")
    with pytest.raises(UnreviewedCommit) as refused:
        verify_reviewed(repository, feature)
    assert f"commit {feature} is not on main of elice/monorepo" in str(refused.value)
    # main force-pushed back to `base`: `merged` is still in the mirror, but off the branch
    git(clone, "push", "-q", "--force", "origin", f"{base}:refs/heads/main")
    with pytest.raises(UnreviewedCommit, match=f"commit {merged} is not on main"):
        verify_reviewed(repository, merged)
    unknown = "e" * 40
    assert unreviewed_commits(repository, [base, merged, unknown, "main", "HEAD"]) == {
        merged: f"commit {merged} is not on main of elice/monorepo",
        unknown: f"commit {unknown} is not on main of elice/monorepo (no such commit there)",
        "main": "'main' is not a full commit SHA, so it cannot be checked against main of "
        "elice/monorepo",
        "HEAD": "'HEAD' is not a full commit SHA, so it cannot be checked against main of "
        "elice/monorepo",
    }


class _AuthHandler(http.server.SimpleHTTPRequestHandler):
    """Git's "dumb" HTTP protocol is static files: serve the bare repo behind Basic auth."""

    def do_GET(self) -> None:
        expected = "Basic " + base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()
        if self.headers.get("Authorization") != expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args: object) -> None:
        return


def test_https_credentials_travel_as_a_header_and_never_in_argv_or_errors(
    remote: tuple[Path, Path],
) -> None:
    bare, _ = remote
    subprocess.run(["git", "-C", str(bare), "update-server-info"], check=True)
    handler = partial(_AuthHandler, directory=str(bare.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/remote.git"
    try:
        with pytest.raises(ToolError) as refused:
            prepare_workspace.fn(GitRepository(url=url, token=SecretStr("wrong")), "HEAD")
        assert "wrong" not in str(refused.value)
        repository = GitRepository(url=url, token=SecretStr(TOKEN))
        ws = prepare_workspace.fn(repository, "HEAD")
        assert (Path(ws.path) / "a.txt").read_text() == "one\n"
        remove_workspace.fn(ws)
    finally:
        server.shutdown()
    env = git_env(repository)
    assert TOKEN not in " ".join(env)  # keys only; the value is base64 in the header
    assert env["GIT_CONFIG_KEY_0"] == "http.extraHeader"
    with pytest.raises(ValueError, match="must not carry credentials"):
        GitRepository(url=f"https://user:{TOKEN}@example.invalid/x.git")
    assert TOKEN not in repr(repository)

"""Approving a paused promotion in the Prefect UI (v1 page), in headless Chromium.

The Resume form takes what `cicd sign` prints: the statement and its SSH signature. The
session's test server runs without its UI, so this module starts a real `prefect server
start` (own home and database) and runs the gate's judgement and pause against it. A
forged signature sent through the form is refused, the run pauses again with a new form,
and the page shows it; the real signature then approves.
"""

from __future__ import annotations

import contextvars
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from playwright.sync_api import Locator, Page, sync_playwright
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.runtime import flow_run as current_run
from prefect.settings import PREFECT_API_URL, temporary_settings

from blocks.approvals import ApprovalPolicy, EnvironmentPolicy
from core.errors import AnswerRefused, GateError
from core.records import PromotionPlan
from stack.ports import free_port
from tasks.approval import answer_form, judge_answer, read_gate, statement_for
from tasks.pause import pause_for_answer
from tasks.signing import sign_statement
from tests.tasks.test_approval import APPROVERS, People, plan

pytestmark = pytest.mark.slow  # real CI runs / servers: out of the fast tier

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
RUN_IDS: queue.Queue[UUID] = queue.Queue()


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prefect server with its UI on a free loopback port; yields its base URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    home = tmp_path_factory.mktemp("prefect-ui-home")
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"{base}/api",
        "PREFECT_UI_API_URL": f"{base}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "true",
    }
    log = (home / "server.log").open("wb")
    args = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    server = subprocess.Popen(
        [*args, "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=home,
        start_new_session=True,  # its own process group: stopped as a whole below
    )
    try:
        end = time.monotonic() + 240
        while True:
            try:
                if httpx.get(f"{base}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > end:
                pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()}")
            time.sleep(1)
        yield base
    finally:
        # flush logs and events bound for this server before it goes away
        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)
        os.killpg(server.pid, signal.SIGINT)  # the server's own clean shutdown
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        log.close()


@flow(name="ui-gate")
def ui_gate(plan_json: str, allowed_signers: str) -> str:
    """The gate's loop in small: judge each answer, wait again after a refused one."""
    p = PromotionPlan.model_validate_json(plan_json)
    run_id = str(current_run.id)
    RUN_IDS.put(UUID(run_id))
    policy = ApprovalPolicy(
        environments={"production": EnvironmentPolicy(approvers=APPROVERS)},
        allowed_signers=allowed_signers,
    )
    gate = policy.environments["production"]
    for _ in range(3):
        answer = pause_for_answer(
            answer_form(p, gate, [], {}, run_id), timeout_s=300, poll_s=1, on_forced=print
        )
        try:
            verdict = judge_answer(
                answer,
                plan=p,
                run_id=run_id,
                extra_env={},
                gate=gate,
                policy=policy,
                promoter=p.promoted_by,
                approved=[],
            )
        except AnswerRefused:
            continue
        return verdict.principal
    return "nobody"


def paused_state(run_id: UUID) -> Any:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).state


def dialog(page: Page) -> Locator:
    """The "Resume Flow Run" dialog."""
    return page.locator(".p-modal", has_text="Resume Flow Run").first


def outside(call: Callable[[], Any]) -> Any:
    """`call()` in another thread: in playwright's sync API, this thread runs an event
    loop, and Prefect's client functions would return coroutines here."""
    ctx = contextvars.copy_context()
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(ctx.run, call).result()


def wait_for_new_form(run_id: UUID, old: Any, states: queue.Queue[Any]) -> None:
    """Until the run is paused again on a form other than `old`, and that form is saved."""
    end = time.monotonic() + 60
    while True:
        assert states.empty(), "a forged signature ended the run"
        if paused_state(run_id).state_details.run_input_keyset not in (None, old):
            try:
                read_gate(run_id)
            except GateError:
                pass
            else:
                return
        assert time.monotonic() < end, "the run did not pause again with a form"
        time.sleep(0.3)


def open_form(page: Page) -> Locator:
    """Click Resume and wait for the dialog's form."""
    page.get_by_role("button", name="Resume").first.click(timeout=60_000)
    modal = dialog(page)
    modal.locator("textarea").first.wait_for(timeout=30_000)
    return modal


def test_approve_through_the_ui_form(ui_server: str, tmp_path: Path) -> None:
    p = plan(promoted_by="sre-oncall")
    people = People(tmp_path, ["platform-lead"])
    states: queue.Queue[Any] = queue.Queue()
    with temporary_settings(updates={PREFECT_API_URL: f"{ui_server}/api"}):
        ctx = contextvars.copy_context()
        worker = threading.Thread(
            target=lambda: states.put(
                ctx.run(
                    ui_gate,
                    plan_json=p.model_dump_json(),
                    allowed_signers=people.allowed_signers,
                    return_state=True,
                )
            ),
            daemon=True,
        )
        worker.start()
        run_id = RUN_IDS.get(timeout=120)

        end = time.monotonic() + 60
        while True:
            try:
                read_gate(run_id)
                break
            except GateError:
                assert time.monotonic() < end, "the run never paused at its gate"
                time.sleep(0.3)
        # what `cicd sign` prints; first an answer whose signature is not one
        statement = statement_for(p, str(run_id), {}, "approve", "", "platform-lead")
        signature = sign_statement(statement, people.keys["platform-lead"])
        first_form = paused_state(run_id).state_details.run_input_keyset

        started = time.monotonic()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            try:
                page = browser.new_page()
                page.route("**/*amplitude.com/**", lambda route: route.abort())
                page.goto(f"{ui_server}/runs/flow-run/{run_id}")
                modal = open_form(page)
                text = modal.inner_text()
                assert "Statement" in text
                assert "Signature" in text
                description = modal.locator("article.markdown-renderer").first
                assert p.release_id in description.inner_text()
                codes = description.locator("code").all_inner_texts()
                assert p.changes[0].new_digest in codes
                modal.locator("textarea").nth(0).fill(statement.model_dump_json())
                modal.locator("textarea").nth(1).fill("-----BEGIN SSH SIGNATURE-----\nforged")
                modal.get_by_role("button", name="Submit").click()
                # refused: the run pauses again, with a new form, which the page shows
                outside(lambda: wait_for_new_form(run_id, first_form, states))
                page.reload()
                modal = open_form(page)
                modal.locator("textarea").nth(0).fill(statement.model_dump_json())
                modal.locator("textarea").nth(1).fill(signature)
                modal.get_by_role("button", name="Submit").click()
                final = states.get(timeout=60)
            finally:
                browser.close()
        seconds = time.monotonic() - started
    assert final.is_completed(), final.message
    assert final.result() == "platform-lead"
    print(f"UI approval cycle: {seconds:.1f}s")

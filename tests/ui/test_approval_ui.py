"""Approving a paused promotion in the Prefect UI (v1 page), in headless Chromium.

The session's test server runs without its UI, so this module starts a real
`prefect server start` (own home and database) and runs the gate against it.
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from playwright.sync_api import Locator, Page, sync_playwright
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.events.worker import EventsWorker
from prefect.flow_runs import pause_flow_run
from prefect.logging.handlers import APILogWorker
from prefect.runtime import flow_run as current_run
from prefect.settings import PREFECT_API_URL, temporary_settings

from cicd.stack import free_port
from tasks.approval import approval_model, read_decision, read_gate
from tasks.exceptions import GateError
from tasks.models import PromotionPlan
from tests.tasks.test_approval import APPROVERS, plan

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
def ui_gate(plan_json: str, approvers: list[str]) -> str:
    p = PromotionPlan.model_validate_json(plan_json)
    RUN_IDS.put(UUID(str(current_run.id)))
    answer = pause_flow_run(
        wait_for_input=approval_model(p, approvers), timeout=300, poll_interval=1
    )
    return read_decision(p, tuple(approvers), answer)


def paused_state(run_id: UUID) -> Any:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).state


def dialog(page: Page) -> Locator:
    """The "Resume Flow Run" dialog."""
    return page.locator(".p-modal", has_text="Resume Flow Run").first


def choose(page: Page, index: int, text: str) -> list[str]:
    """Pick `text` in the index-th select of the dialog; returns the options offered."""
    modal = dialog(page)
    modal.locator(".p-select-button__control").nth(index).click()
    page.keyboard.press("ArrowDown")  # opens the option list
    options = page.locator(".p-select-option")
    options.first.wait_for()
    offered = [o.strip() for o in options.all_inner_texts()]
    page.locator(".p-select-option", has_text=text).first.click()
    return offered


def test_approve_through_the_ui_form(ui_server: str, tmp_path: Path) -> None:
    p = plan(promoted_by="sre-oncall")
    states: queue.Queue[Any] = queue.Queue()
    with temporary_settings(updates={PREFECT_API_URL: f"{ui_server}/api"}):
        ctx = contextvars.copy_context()
        worker = threading.Thread(
            target=lambda: states.put(
                ctx.run(
                    ui_gate,
                    plan_json=p.model_dump_json(),
                    approvers=list(APPROVERS),
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

        started = time.monotonic()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            try:
                page = browser.new_page()
                page.route("**/*amplitude.com/**", lambda route: route.abort())
                page.goto(f"{ui_server}/runs/flow-run/{run_id}")
                page.get_by_role("button", name="Resume").first.click(timeout=60_000)
                modal = dialog(page)
                modal.get_by_text("Approver", exact=True).wait_for(timeout=30_000)
                description = modal.locator("article.markdown-renderer").first
                assert p.release_id in description.inner_text()
                codes = description.locator("code").all_inner_texts()
                assert p.changes[0].new_digest in codes
                assert p.changes[0].current_digest in codes

                offered = choose(page, 0, "platform-lead")
                assert offered == ["platform-lead", "release-manager"]  # not the promoter
                modal.locator("textarea").nth(0).fill("000000000000")  # another release
                choose(page, 1, "approve")
                modal.get_by_role("button", name="Submit").click()
                page.wait_for_timeout(2000)
                assert paused_state(run_id).is_paused()
                assert modal.is_visible()
                page.screenshot(path=str(tmp_path / "refused.png"))

                modal.locator("textarea").nth(0).fill(p.release_id)
                modal.get_by_role("button", name="Submit").click()
                final = states.get(timeout=60)
            finally:
                browser.close()
        seconds = time.monotonic() - started
    assert final.is_completed(), final.message
    assert final.result() == "platform-lead"
    print(f"UI approval cycle: {seconds:.1f}s")

"""End to end in a real browser: JupyterLab (started here) + the capsem labextension, Debian's
Chromium driven by Playwright, one real capsem kernel (VM) with real egress through the policy proxy.

A local HTTP server on 127.0.0.1 stands in for the internet. The policy allows GET /ok* on it and
denies /secret* by an explicit rule. Inside the guest, 127.0.0.1 is the guest's own loopback, so
the cells send their requests through the sandbox's HTTP proxy explicitly (the guest's
$http_proxy): the host-side proxy then decides by the policy and connects to the host's server.

Screenshots go to test-artifacts/ (launcher, notebook + status bar, the Sandbox panel, filters).
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jupyter_helpers import start_server

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
CAPSEM_CLI = [sys.executable, "-m", "capsem_vm.cli"]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
KERNEL_LABEL = "Python 3 (Capsem sandbox)"
BOOT_TIMEOUT_MS = 420_000
CELL_TIMEOUT_MS = 240_000


class Site(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_GET(self):  # noqa: N802
        Site.seen.append(self.path)
        body = b"capsem-ok from the host" if self.path.startswith("/ok") else b"the secret"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def policy_text(port: int) -> str:
    return f"""
[[rule]]
name = "local-ok"
host = "127.0.0.1"
scheme = "http"
port = {port}
methods = ["GET"]
paths = ["/ok*"]
action = "allow"
reason = "the test's local server (allowed paths)"

[[rule]]
name = "no-secrets"
host = "127.0.0.1"
port = {port}
paths = ["/secret*"]
action = "deny"
reason = "secrets stay on the host"
"""


def cell_code(port: int) -> tuple[str, str]:
    opener = ("import os, urllib.request, urllib.error\n"
              "# 127.0.0.1 in here is the guest's own loopback: send these to the sandbox's proxy explicitly\n"
              "os.environ['no_proxy'] = os.environ['NO_PROXY'] = ''\n"
              "opener = urllib.request.build_opener(urllib.request.ProxyHandler({'http': os.environ['http_proxy']}))\n")
    allowed = opener + f"print(opener.open('http://127.0.0.1:{port}/ok.txt', timeout=120).read().decode())"
    denied = ("try:\n"
              f"    opener.open('http://127.0.0.1:{port}/secret.txt', timeout=120)\n"
              "except urllib.error.HTTPError as e:\n"
              "    print('blocked with', e.code)")
    return allowed, denied


@pytest.fixture(scope="module")
def lab(tmp_path_factory, image_dir):
    tmp = tmp_path_factory.mktemp("lab-e2e")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Site)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    policy = tmp / "policy.toml"
    policy.write_text(policy_text(port))
    policy.chmod(0o600)
    prefix = tmp / "prefix"
    subprocess.run(CAPSEM_CLI + ["kernel", "install", "--prefix", str(prefix), "--policy", str(policy)],
                   check=True, capture_output=True, timeout=120)
    notebooks = tmp / "notebooks"
    notebooks.mkdir()
    rt = tmp / "rt"
    rt.mkdir(mode=0o700)
    env = {"JUPYTER_PATH": str(prefix / "share" / "jupyter"), "CAPSEM_RUNTIME_DIR": str(rt)}
    server = start_server(tmp, lab=True, root_dir=notebooks, env=env, startup_timeout=180,
                          args=["--CapsemExtension.poll_interval=0.3"])
    try:
        yield {"server": server, "port": port, "notebooks": notebooks, "policy": policy}
    finally:
        server.stop()
        httpd.shutdown()
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "lab-e2e-server.log").write_text(server.log())


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def shot(page, name: str, locator=None) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"lab-{name}.png"
    (locator or page).screenshot(path=str(path))
    return path


def wait_kernel_idle(page, attempts: int = 3) -> None:
    """The notebook's kernel connection reaches idle. On a loaded host JupyterLab's first kernel
    connection can stall ("Unknown"); a page reload reconnects to the same kernel."""
    idle = page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")
    for attempt in range(attempts):
        try:
            idle.wait_for(timeout=180_000)
            return
        except Exception:
            if attempt == attempts - 1:
                raise
            shot(page, f"reload-{attempt}")
            page.reload()
            page.locator(".jp-capsem-status-label", has_text="Sandbox ready").wait_for(timeout=120_000)


def run_cell(page, index: int, code: str) -> None:
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    cell.locator(".cm-content").click()
    page.keyboard.insert_text(code)
    page.keyboard.press("Shift+Enter")


def cell_output(page, index: int):
    return page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-OutputArea-output")


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1500, "height": 950})
    page.set_default_timeout(60_000)
    page.console = []
    page.on("console", lambda m: page.console.append(f"{m.type}: {m.text}"))
    yield page
    shot(page, "last")  # where it ended (on a failure: what the browser showed)
    page.close()


def test_lab_shows_the_sandbox_at_work(lab, page):
    server, port = lab["server"], lab["port"]
    console = page.console
    page.goto(f"{server.url}lab?token={server.token}")

    # the launcher offers our kernel, with our logo
    card = page.locator(f".jp-LauncherCard[title='{KERNEL_LABEL}']").first
    card.wait_for()
    assert card.locator("img").get_attribute("src").startswith(("data:image/png", "/kernelspecs", "http"))
    shot(page, "1-launcher")
    t0 = time.monotonic()
    card.click()

    # the status item appears for the capsem kernel and reaches "ready" once the VM is up
    status = page.locator(".jp-capsem-status")
    status.locator(".jp-capsem-status-label", has_text="Sandbox ready").wait_for(timeout=BOOT_TIMEOUT_MS)
    boot_s = time.monotonic() - t0
    wait_kernel_idle(page)
    assert not status.locator(".jp-capsem-status-blocked").is_visible()  # 0 blocked: no badge

    allowed, denied = cell_code(port)
    run_cell(page, 0, allowed)
    shot(page, "1b-first-cell")
    cell_output(page, 0).filter(has_text="capsem-ok from the host").wait_for(timeout=CELL_TIMEOUT_MS)
    run_cell(page, 1, denied)
    cell_output(page, 1).filter(has_text="blocked with 403").wait_for(timeout=CELL_TIMEOUT_MS)
    assert Site.seen.count("/ok.txt") == 1 and "/secret.txt" not in Site.seen

    # a notification names the host and the rule
    toast = page.locator(".Toastify__toast", has_text="Sandbox blocked")
    toast.first.wait_for(timeout=30_000)
    toast_text = toast.first.inner_text()
    assert f"127.0.0.1:{port}/secret.txt" in toast_text and 'rule "no-secrets"' in toast_text, toast_text

    # the status item: ready, 1 blocked
    badge = status.locator(".jp-capsem-status-blocked")
    badge.filter(has_text="1 blocked").wait_for(timeout=30_000)
    assert "Sandbox ready" in status.inner_text() and "1 blocked" in status.inner_text()
    shot(page, "2-notebook")

    # click: the Sandbox panel with facts, policy and both requests with the right decisions
    status.click()
    panel = page.locator("#capsem-sandbox-panel")
    panel.wait_for(state="visible")
    rows = panel.locator("tr.jp-capsem-row[data-kind='http']")
    rows.filter(has_text="/secret.txt").wait_for(timeout=30_000)
    by_path = {}
    for i in range(rows.count()):
        cells = [c.inner_text() for c in rows.nth(i).locator("td").all()]
        by_path[cells[4]] = cells
    ok, secret = by_path["/ok.txt"], by_path["/secret.txt"]
    assert ok[1:4] == ["allow", "GET", f"127.0.0.1:{port}"] and ok[5] == "200" and ok[6] == "local-ok", ok
    assert secret[1:4] == ["deny", "GET", f"127.0.0.1:{port}"] and secret[5] == "403" and secret[6] == "no-secrets"
    facts_text = panel.locator(".jp-capsem-facts").inner_text()
    assert "ready" in facts_text and ("emulated" in facts_text or "KVM" in facts_text)
    assert str(lab["notebooks"].resolve()) in facts_text and "read-write" in facts_text
    rules = panel.locator(".jp-capsem-rule")
    assert rules.filter(has_text="local-ok").count() == 1 and rules.filter(has_text="no-secrets").count() == 1
    shot(page, "3-panel")
    shot(page, "3-panel-only", panel)

    # filters: blocked only, then a host search that matches nothing
    panel.locator(".jp-capsem-filter-blocked input").check()
    assert panel.locator("tr.jp-capsem-row[data-decision='allow']").count() == 0
    assert panel.locator("tr.jp-capsem-row[data-decision='deny']").count() >= 1
    shot(page, "4-panel-blocked-only", panel)
    panel.locator(".jp-capsem-filter-blocked input").uncheck()
    panel.locator(".jp-capsem-filter-host").fill("no-such-host")
    panel.locator("tr.jp-capsem-empty", has_text="No request matches").wait_for()
    panel.locator(".jp-capsem-filter-host").fill("")

    errors = [c for c in console if c.startswith("error") and "capsem" in c.lower()]
    assert not errors, errors
    (ARTIFACTS / "lab-e2e-timings.json").write_text(json.dumps({"boot_to_ready_s": round(boot_s, 1)}))

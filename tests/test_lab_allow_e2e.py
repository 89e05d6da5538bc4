""""Allow this host…" end to end (issue 22): JupyterLab (started here, with
c.CapsemExtension.allow_policy_edits = True) + the capsem labextension, Debian's Chromium driven by
Playwright, one real capsem kernel (VM) with real egress through the policy proxy.

A local HTTP server stands in for the internet under the name data.test.example: the Jupyter
server's config installs the process egress runtime with a resolve map for it (as egress_world does
for in-process tests). The policy allows GET /ok* there (naming the stand-in's loopback address).
The notebook GETs /data.csv: refused (default deny). In the panel the refused row offers "allow this
host…": the server's suggestion (GET /data.csv on that host) is shown and the admin adds it. Without
a kernel restart the same request passes, decided by the new rule. (The connection to the stand-in's
loopback address is admitted by the rule that names it, local-ok; suggest never writes `addresses`.)
The policy-change row (who, what, which file) is in the panel's log.

Screenshots go to test-artifacts/ (lab-allow-*.png).
"""

from __future__ import annotations

import http.server
import subprocess
import threading
import tomllib

import pytest

from capsem_kernel.server.policy_allow import file_hash
from jupyter_helpers import start_server
from test_lab_e2e import (ARTIFACTS, BOOT_TIMEOUT_MS, CAPSEM_CLI, CELL_TIMEOUT_MS, KERNEL_LABEL, REPO,  # noqa: F401
                          browser, cell_output, page, run_cell, shot, wait_kernel_idle)

pytestmark = pytest.mark.vm
HOST = "data.test.example"
OBSERVE_LABEL = "Python 3 (Capsem observe)"


class Site(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_GET(self):  # noqa: N802
        Site.seen.append(self.path)
        body = b"capsem-data 1,2,3"
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
host = "{HOST}"
scheme = "http"
port = {port}
methods = ["GET"]
paths = ["/ok*"]
addresses = ["127.0.0.1"]
action = "allow"
reason = "the test's stand-in server (allowed paths)"
"""


def fetch_code(port: int, path: str = "/data.csv") -> str:
    return ("import os, urllib.request, urllib.error\n"
            "os.environ['no_proxy'] = os.environ['NO_PROXY'] = ''\n"
            "opener = urllib.request.build_opener(urllib.request.ProxyHandler({'http': os.environ['http_proxy']}))\n"
            "try:\n"
            f"    print('got', opener.open('http://{HOST}:{port}{path}', timeout=120).read().decode())\n"
            "except urllib.error.HTTPError as e:\n"
            "    print('blocked with', e.code, e.headers.get('X-Capsem-Policy'))\n")


RUNTIME_CONFIG = """
# the test's stand-in for the internet: {host} resolves to the local server (egress_world does the same)
from capsem_vm.egress_runtime import EgressRuntime, set_process_runtime
set_process_runtime(EgressRuntime(resolve={{"{host}": "127.0.0.1"}}))
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory, image_dir):
    tmp = tmp_path_factory.mktemp("lab-allow")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Site)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    policy = tmp / "policy.toml"
    policy.write_text(policy_text(port))
    policy.chmod(0o600)
    prefix = tmp / "prefix"
    subprocess.run(CAPSEM_CLI + ["kernel", "install", "--prefix", str(prefix), "--policy", str(policy)],
                   check=True, capture_output=True, timeout=120)
    observed = tmp / "policy-observe.toml"  # its own file: the first test's apply does not touch it
    observed.write_text(policy_text(port))
    observed.chmod(0o600)
    subprocess.run(CAPSEM_CLI + ["kernel", "install", "--prefix", str(prefix), "--policy", str(observed),
                                 "--name", "capsem-observe", "--display-name", OBSERVE_LABEL, "--observe"],
                   check=True, capture_output=True, timeout=120)
    # this checkout's built labextension, ahead of any installed copy (JUPYTER_PATH comes first)
    built = REPO / "capsem_kernel" / "labextension"
    if (built / "package.json").exists():
        dest = prefix / "share" / "jupyter" / "labextensions" / "@capsem" / "jupyterlab-capsem"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(built)
    config = tmp / "jupyter-config"
    config.mkdir()
    (config / "jupyter_server_config.py").write_text(RUNTIME_CONFIG.format(host=HOST))
    notebooks = tmp / "notebooks"
    notebooks.mkdir()
    rt = tmp / "rt"
    rt.mkdir(mode=0o700)
    env = {"JUPYTER_PATH": str(prefix / "share" / "jupyter"), "CAPSEM_RUNTIME_DIR": str(rt),
           "CAPSEM_DATA_DIR": str(tmp / "data")}
    server = start_server(tmp, lab=True, root_dir=notebooks, env=env, startup_timeout=180,
                          args=["--CapsemExtension.poll_interval=0.3", "--CapsemExtension.allow_policy_edits=True"])
    try:
        yield {"server": server, "port": port, "policy": policy}
    finally:
        server.stop()
        httpd.shutdown()
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "lab-allow-server.log").write_text(server.log())


def test_allow_this_host_from_the_panel_applies_without_a_kernel_restart(lab, page):
    server, port, policy = lab["server"], lab["port"], lab["policy"]
    page.goto(f"{server.url}lab?token={server.token}")
    page.locator(f".jp-LauncherCard[title='{KERNEL_LABEL}']").first.click()
    status = page.locator(".jp-capsem-status")
    status.locator(".jp-capsem-status-label", has_text="Sandbox ready").wait_for(timeout=BOOT_TIMEOUT_MS)
    wait_kernel_idle(page)
    assert status.get_attribute("data-observe") == "false"
    kernel_id = server.get("/capsem/kernels")[1]["kernels"][0]["kernel_id"]
    started_at = server.get(f"/capsem/kernels/{kernel_id}")[1]["started_at"]

    # 1. refused by default deny
    run_cell(page, 0, fetch_code(port))
    cell_output(page, 0).filter(has_text="blocked with 403").wait_for(timeout=CELL_TIMEOUT_MS)
    assert 'rule="default"' in cell_output(page, 0).inner_text()
    assert "/data.csv" not in Site.seen

    # 2. the panel: the refused row offers "allow this host…", the server's suggestion is shown
    status.click()
    panel = page.locator("#capsem-sandbox-panel")
    panel.wait_for(state="visible")
    row = panel.locator("tr.jp-capsem-row[data-decision='deny']", has_text="/data.csv").first
    row.wait_for(timeout=30_000)
    assert panel.locator("tr.jp-capsem-row[data-decision='allow'] .jp-capsem-allow-button").count() == 0
    row.locator(".jp-capsem-allow-button").click()
    box = panel.locator(".jp-capsem-allow")
    box.locator(".jp-capsem-allow-toml").wait_for(timeout=30_000)
    toml_shown = box.locator(".jp-capsem-allow-toml").inner_text()
    assert f'host = "{HOST}"' in toml_shown and '"/data.csv"' in toml_shown and 'methods = ["GET"]' in toml_shown
    assert str(policy) in box.inner_text()
    shot(page, "allow-1-suggested", panel)

    # 3. the admin adds it: the file gets exactly that rule, the running kernel reloads it
    before = policy.read_text()
    box.locator(".jp-capsem-allow-apply").click()
    box.locator(".jp-capsem-allow-done").wait_for(timeout=60_000)
    assert "applies now" in box.inner_text(), box.inner_text()
    after = policy.read_text()
    assert after.startswith(before)
    new_rules = tomllib.loads(after)["rule"][len(tomllib.loads(before)["rule"]):]
    assert [(r["host"], r["methods"], r["paths"], r["port"]) for r in new_rules] == [(HOST, ["GET"], ["/data.csv"], port)]
    name = new_rules[0]["name"]
    # the policy-change row: who (the Jupyter user), what (the rule), the file
    change = panel.locator("tr.jp-capsem-row[data-kind='policy']")
    change.first.wait_for(timeout=30_000)
    title = change.first.get_attribute("title")
    assert str(policy) in title and name in change.first.inner_text() and "Jupyter user" in title, title
    shot(page, "allow-2-applied", panel)

    # 4. same kernel, no restart: the next request passes (the new rule decides it)
    run_cell(page, 1, fetch_code(port))
    cell_output(page, 1).filter(has_text="got capsem-data 1,2,3").wait_for(timeout=CELL_TIMEOUT_MS)
    assert Site.seen.count("/data.csv") == 1
    assert server.get(f"/capsem/kernels/{kernel_id}")[1]["started_at"] == started_at  # never restarted
    allowed = panel.locator("tr.jp-capsem-row[data-decision='allow']", has_text="/data.csv")
    allowed.first.wait_for(timeout=30_000)
    assert name in allowed.first.inner_text()
    shot(page, "allow-3-passes")

    # 5. what the browser cannot prove is refused, nothing written: a stale file hash, a row that was
    # not refused, a row the policy allows by now
    rows = server.get(f"/capsem/kernels/{kernel_id}/network")[1]["rows"]
    denied_id = next(r["id"] for r in rows if r["decision"] == "deny" and r["path"] == "/data.csv")
    allowed_id = next(r["id"] for r in rows if r["decision"] == "allow")
    url, now = f"/capsem/kernels/{kernel_id}/allow", file_hash(policy.read_text())
    for row_id, base, want in ((denied_id, "0" * 64, (409, "changed")), (allowed_id, now, (404, "no-row")),
                               (denied_id, now, (409, "not-suggestible"))):
        code, body = server.request("POST", url, {"row": row_id, "base": base})
        assert (code, body.get("code")) == want, (code, body)
    assert policy.read_text() == after


def painted(locator) -> str:
    return locator.evaluate("e => getComputedStyle(e).backgroundColor")


def test_observe_mode_is_shown_in_warning_colours_and_would_deny_rows_can_be_allowed(lab, page):
    """A kernelspec in observe mode: the status item says so in warning colours, the panel warns,
    a request the policy refuses goes out and its would-deny row is styled, counted as blocked,
    kept by the blocked-only filter, and offers "allow this host…" (suggested from that row)."""
    server, port = lab["server"], lab["port"]
    page.goto(f"{server.url}lab/workspaces/observe?reset&token={server.token}")
    page.locator(f".jp-LauncherCard[title='{OBSERVE_LABEL}']").first.click()
    status = page.locator(".jp-capsem-status")
    label = status.locator(".jp-capsem-status-label")
    label.filter(has_text="Sandbox ready").wait_for(timeout=BOOT_TIMEOUT_MS)
    wait_kernel_idle(page)
    label.filter(has_text="observe mode").wait_for(timeout=30_000)
    assert status.get_attribute("data-observe") == "true"
    assert painted(status) not in ("rgba(0, 0, 0, 0)", "transparent"), painted(status)
    assert "OBSERVE MODE" in status.get_attribute("title")

    run_cell(page, 0, fetch_code(port, "/observed.csv"))
    cell_output(page, 0).filter(has_text="got capsem-data").wait_for(timeout=CELL_TIMEOUT_MS)
    assert "/observed.csv" in Site.seen
    status.locator(".jp-capsem-status-blocked").filter(has_text="blocked").wait_for(timeout=30_000)
    shot(page, "observe-1-status")

    status.click()
    panel = page.locator("#capsem-sandbox-panel")
    panel.wait_for(state="visible")
    panel.locator(".jp-capsem-observe").wait_for()
    row = panel.locator("tr.jp-capsem-row[data-decision='would-deny']", has_text="/observed.csv").first
    row.wait_for(timeout=30_000)
    # the row (narrow panel: one flex row) or its cells (wide table) carry the warning colour
    assert {painted(row), painted(row.locator("td").first)} - {"rgba(0, 0, 0, 0)", "transparent"}
    panel.locator(".jp-capsem-filter-blocked input").check()
    assert panel.locator("tr.jp-capsem-row[data-decision='would-deny']").count() >= 1
    assert panel.locator("tr.jp-capsem-row[data-decision='allow']").count() == 0
    row.locator(".jp-capsem-allow-button").click()
    toml_shown = panel.locator(".jp-capsem-allow .jp-capsem-allow-toml")
    toml_shown.wait_for(timeout=30_000)
    assert '"/observed.csv"' in toml_shown.inner_text()
    shot(page, "observe-2-panel", panel)

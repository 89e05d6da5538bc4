"""`capsem policy suggest` from a real capsem kernel (issue 22): notebook code in a real VM is
refused, the command reads the audit rows the kernel caused, applies its suggestions to the
user's policy file, and a kernel started afterwards makes the same requests, which pass, while a
neighbouring host and path stay denied.

"The internet" is egress_world.World (servers on 127.0.0.1). Loopback is a protected address that
only a rule naming it (`addresses`) may reach and suggest never writes one (a public host needs
none): after applying, the test adds `addresses = ["127.0.0.1"]` to the suggested rules, nothing
else. Two kernels, one after the other (the policy is read when a kernel starts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from egress_world import World
from kernel_helpers import KERNEL, cell_json, start_kernel, stop_kernel

from capsem_kernel import loop_thread
from capsem_vm.policy import parse_policy
from capsem_vm.policy.suggest import REASON, user_rules

pytestmark = pytest.mark.vm
CAPSEM_CLI = [sys.executable, "-m", "capsem_vm.cli"]
NEW, OTHER = "data.test.example", "other.test.example"

# what the notebook does: the test API on a path its rule does not list, and a host no rule names
WORKLOAD = r'''
import json, urllib.request, urllib.error
def get(url):
    try:
        with urllib.request.urlopen(url, timeout=60) as f:
            return [f.status, f.read(20000).decode(errors="replace")]
    except urllib.error.HTTPError as e:
        return [e.code, e.headers.get("X-Capsem-Policy", "")]
    except Exception as e:
        return [0, f"{type(e).__name__}: {e}"[:300]]
R = {name: get(url) for name, url in URLS.items()}
print(json.dumps(R))
'''


def urls(w, *extra: tuple[str, str]) -> dict:
    return dict({"api_v2": f"https://api.test.example:{w.HTTPS}/v2/items",
                 "new_host": f"https://{NEW}:{w.HTTPS}/echo/data.csv"}, **dict(extra))


def run_workload(kc, u: dict) -> dict:
    return cell_json(kc, f"URLS = {json.dumps(u)}\n" + WORKLOAD, timeout=300)


@pytest.fixture(scope="module")
def world(capsem_kernelspecs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("suggest-vm")
    os.chmod(tmp, 0o755)
    w = loop_thread.run_sync(World.create(tmp, extra_names=(NEW, OTHER)), timeout=180)
    try:
        cfg = Path(os.environ["CAPSEM_CONFIG_DIR"])   # the kernelspec names no policy: the user's file
        cfg.mkdir(mode=0o755, exist_ok=True)
        w.user_policy = cfg / "policy.toml"
        w.user_policy.write_text(w.policy_text)
        os.chmod(w.user_policy, 0o644)
        w.nb = tmp / "notebook"
        w.nb.mkdir()
        yield w
    finally:
        loop_thread.run_sync(w.close(), timeout=60)


def test_suggest_from_a_real_kernels_refusals_then_a_new_kernel_passes_and_neighbours_stay_denied(world):
    w = world
    km, kc = start_kernel(KERNEL, cwd=w.nb)
    try:
        kid = km.kernel_id
        before = run_workload(kc, urls(w))
    finally:
        stop_kernel(km, kc)
    assert before["api_v2"][0] == 403, before
    assert before["new_host"][0] != 200, before
    # the rows the proxy worker (the 403) and the bridge (the refused connection) wrote
    assert w.wait_rows(kernel=kid, kind="http", code="default-deny")
    assert w.wait_rows(kernel=kid, kind="connect", host=NEW, code="default-deny")
    codes = {(r["kind"], r["code"]) for r in w.rows(kernel=kid) if r["decision"] == "deny"}
    assert ("http", "default-deny") in codes, codes

    old = w.user_policy.read_text()
    proc = subprocess.run(CAPSEM_CLI + ["policy", "suggest", "--db", str(w.audit_db), "--kernel", kid,
                                        "--apply", str(w.user_policy), "--yes"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    applied_text = w.user_policy.read_text()
    assert applied_text.startswith(old) and "+[[rule]]" in proc.stderr
    applied = parse_policy(applied_text, str(w.user_policy))
    new = {r.host.text: r for r in user_rules(applied) if r.reason == REASON}
    assert {"api.test.example", NEW} <= set(new), proc.stdout
    api = new["api.test.example"]
    assert api.methods == {"GET"} and api.paths == ("/v2/items",) and api.ports == {w.HTTPS}
    assert new[NEW].ports == {w.HTTPS} and new[NEW].schemes == {"https"}

    stand_in = applied_text.replace(f'reason = "{REASON}"', f'addresses = ["127.0.0.1"]\nreason = "{REASON}"')
    w.user_policy.write_text(stand_in)
    km, kc = start_kernel(KERNEL, cwd=w.nb)
    try:
        after = run_workload(kc, urls(w, ("neighbour_path", f"https://api.test.example:{w.HTTPS}/v2/other"),
                                      ("neighbour_host", f"https://{OTHER}:{w.HTTPS}/echo/data.csv")))
    finally:
        stop_kernel(km, kc)
    assert after["api_v2"][0] == 200 and json.loads(after["api_v2"][1])["path"] == "/v2/items", after
    assert after["new_host"][0] == 200, after
    assert after["neighbour_path"][0] == 403, after
    assert after["neighbour_host"][0] != 200, after

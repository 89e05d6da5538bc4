"""The capsem server extension without VMs: audit queries, policy rendering, and a real Jupyter
server (subprocess) for auth, unknown kernels and non-capsem kernels. The capsem-kernel half is
test_server_ext_vm.py."""

from __future__ import annotations

import http.client
import json
import time
from types import SimpleNamespace

import pytest

from capsem_kernel.server import facts, network
from capsem_kernel.server.policy_view import active_policy, kernel_policy, policy_json, rule_summary
from capsem_vm.policy import parse_policy
from capsem_vm.proxy.audit import AuditLog
from jupyter_helpers import start_server

KERNEL = "0b7f9a52-1111-4222-8333-444455556666"
OTHER = "9c8d7e6f-aaaa-4bbb-8ccc-ddddeeeeffff"


@pytest.fixture
def audit_db(tmp_path):
    db = tmp_path / "audit.sqlite3"
    log = AuditLog(db)
    t = time.time()
    log.record(KERNEL, "dns", method="A", url="pypi.org", host="pypi.org", decision="allow", rule="pypi-index", ts=t)
    log.record(KERNEL, "http", method="GET", url="https://pypi.org/simple/numpy/?token=x", host="pypi.org",
               port=443, status=200, decision="allow", rule="pypi-index", ts=t + 1)
    log.record(KERNEL, "http", method="POST", url="https://evil.example/upload", host="evil.example", port=443,
               status=403, decision="deny", rule="default", reason="no rule allows this (default deny)", ts=t + 2)
    log.record(OTHER, "http", method="GET", url="http://other.example/", host="other.example", port=80,
               status=403, decision="deny", rule="default", ts=t + 3)
    log.record(KERNEL, "dns", method="A", url="100%_weird.example", host="100%_weird.example", decision="deny",
               rule="default", ts=t + 4)
    log.close()
    return db


# --- network.py --------------------------------------------------------------------------------

def test_network_rows_of_one_kernel_shaped_for_the_panel(audit_db):
    out = network.query(audit_db, KERNEL)
    assert [r["kind"] for r in out["rows"]] == ["dns", "http", "http", "dns"]
    assert (out["total"], out["blocked"]) == (4, 2)
    http_row = out["rows"][1]
    assert http_row["path"] == "/simple/numpy/?token=x" and http_row["method"] == "GET"
    assert http_row["status"] == 200 and http_row["rule"] == "pypi-index" and http_row["decision"] == "allow"
    assert out["rows"][0]["path"] == ""  # DNS rows have no path
    assert out["last_id"] == out["rows"][-1]["id"]


def test_network_filters_after_and_limit(audit_db):
    blocked = network.query(audit_db, KERNEL, blocked=True)["rows"]
    assert [r["host"] for r in blocked] == ["evil.example", "100%_weird.example"]
    assert [r["host"] for r in network.query(audit_db, KERNEL, host="EVIL")["rows"]] == ["evil.example"]
    # LIKE wildcards in the search are literal
    assert [r["host"] for r in network.query(audit_db, KERNEL, host="%_")["rows"]] == ["100%_weird.example"]
    assert network.query(audit_db, KERNEL, host="_")["rows"][0]["host"] == "100%_weird.example"
    all_rows = network.query(audit_db, KERNEL)["rows"]
    after = network.query(audit_db, KERNEL, after_id=all_rows[1]["id"])
    assert [r["id"] for r in after["rows"]] == [r["id"] for r in all_rows[2:]]
    newest = network.query(audit_db, KERNEL, limit=2)["rows"]
    assert [r["id"] for r in newest] == [r["id"] for r in all_rows[-2:]]
    assert network.query(audit_db, "no-such-kernel") == {"rows": [], "last_id": 0, "total": 0, "blocked": 0}


def test_network_without_database(tmp_path):
    assert network.query(tmp_path / "missing.sqlite3", KERNEL)["rows"] == []


# --- policy_view.py ----------------------------------------------------------------------------

POLICY = """
[[rule]]
include = "pypi"

[[rule]]
name = "local-ok"
host = "127.0.0.1"
scheme = "http"
port = 8123
paths = ["/ok*"]
action = "allow"
reason = "the test server"

[[rule]]
name = "no-github"
host = "*.github.com"
action = "deny"

[[credential]]
name = "gh"
hosts = ["api.github.com"]
env = "GITHUB_TOKEN"
header = "Authorization"
"""


def test_policy_rendering_is_readable():
    p = parse_policy(POLICY, "/etc/capsem/policy.toml")
    out = policy_json(p, "/etc/capsem/policy.toml")
    by_name = {r["name"]: r for r in out["rules"]}
    assert by_name["pypi-index"]["summary"] == "allow GET, HEAD https://pypi.org paths /simple, /simple/*, /pypi/*"
    assert by_name["local-ok"]["summary"] == "allow http://127.0.0.1:8123 paths /ok*"
    assert by_name["local-ok"]["origin"] == "/etc/capsem/policy.toml:5"
    assert by_name["no-github"]["summary"] == "deny any scheme://*.github.com (any port)"
    assert rule_summary(p.rules[0]).startswith("deny")  # the built-in DoH deny list comes first
    assert out["credentials"] == [{"name": "gh", "hosts": ["api.github.com"], "header": "Authorization",
                                   "query": None, "guest_env": None}]
    assert out["default"] == "deny"


def test_active_policy_from_file_and_errors(tmp_path):
    f = tmp_path / "policy.toml"
    f.write_text(POLICY)
    f.chmod(0o600)
    out = active_policy(str(f))
    assert out["source"] == str(f) and any(r["name"] == "local-ok" for r in out["rules"])
    # a policy inside a folder the guest can write is refused, and said so
    refused = active_policy(str(f), guest_writable=[str(tmp_path)])
    assert "error" in refused and "VM can write" in refused["error"]
    missing = active_policy(str(tmp_path / "nope.toml"))
    assert missing["rules"] == [] and "cannot read" in missing["error"]


def test_kernel_policy_is_the_one_the_egress_loaded(tmp_path):
    loaded = parse_policy(POLICY, "/etc/capsem/loaded.toml")
    prov = SimpleNamespace(policy="/somewhere/else.toml",
                           kernel_vm=SimpleNamespace(vm=SimpleNamespace(egress=SimpleNamespace(policy=loaded))))
    out = kernel_policy(prov)
    assert out["source"] == "/etc/capsem/loaded.toml" and any(r["name"] == "local-ok" for r in out["rules"])
    deny_all = parse_policy("", "<default: deny all>")
    prov.kernel_vm.vm.egress.policy = deny_all
    assert kernel_policy(prov)["source"] is None and "deny-all" in kernel_policy(prov)["description"]
    # no VM yet: the provisioner's trait decides
    f = tmp_path / "p.toml"
    f.write_text(POLICY)
    f.chmod(0o600)
    assert kernel_policy(SimpleNamespace(policy=str(f), kernel_vm=None))["source"] == str(f)


# --- facts.py ----------------------------------------------------------------------------------

def test_facts_tell_capsem_from_other_kernels():
    local = SimpleNamespace(provisioner=SimpleNamespace(), kernel_name="python3", kernel_spec=None)
    assert not facts.is_capsem(local)
    with pytest.raises(facts.NotCapsem):
        facts.kernel_facts("k", local)
    spec = SimpleNamespace(metadata={"kernel_provisioner": {"provisioner_name": "capsem-provisioner"}})
    shut_down = SimpleNamespace(provisioner=None, kernel_name="capsem", kernel_spec=spec)
    assert facts.is_capsem(shut_down)
    assert facts.kernel_facts("k", shut_down)["state"] == "dead"
    assert facts.accel_label("tcg") == "emulated (TCG)" and facts.accel_label("kvm") == "KVM"



def test_facts_of_a_dead_kernel_say_why_it_died():
    from capsem_kernel.provisioner import CapsemProvisioner
    prov = CapsemProvisioner.__new__(CapsemProvisioner)  # the facts read only traits and kernel_vm
    reason = "virtiofsd for /nb exited (signal 9)"
    prov.kernel_vm = SimpleNamespace(
        state="dead", poll=lambda: 1,
        info=lambda: {"death_reason": reason, "shutdown_reason": None, "shares": [], "timings": {},
                      "runtime_dir": "/run/capsem/vm-x", "pooled": False})
    out = facts.kernel_facts("k", SimpleNamespace(provisioner=prov, kernel_name="capsem"))
    assert out["state"] == "dead" and out["death_reason"] == reason and out["shutdown_reason"] is None
    # where its logs are, and whether it was a pooled VM: what a user debugging it asks next
    assert out["runtime_dir"] == "/run/capsem/vm-x" and out["pooled"] is False


# --- a real Jupyter server ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jserver")
    srv = start_server(tmp, args=[f"--CapsemExtension.audit_db={tmp / 'audit.sqlite3'}"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def python_kernel(server):
    status, body = server.request("POST", "/api/kernels", {"name": "python3"})
    assert status == 201, body
    yield body["id"]
    server.request("DELETE", f"/api/kernels/{body['id']}")


ROUTES = ["/capsem/kernels", "/capsem/kernels/{k}", "/capsem/kernels/{k}/policy", "/capsem/kernels/{k}/network",
          "/capsem/kernels/{k}/events"]


def test_extension_is_enabled_by_the_installed_config(server):
    assert "capsem: server extension loaded (policy edits from the browser disabled)" in server.log()


@pytest.mark.parametrize("route", ROUTES)
def test_unauthenticated_requests_get_403(server, python_kernel, route):
    status, body = server.get(route.format(k=python_kernel), token=False)
    assert status == 403, body
    status, _ = server.request("PUT", f"/capsem/kernels/{python_kernel}/policy", {"text": ""}, token=False)
    assert status == 403


@pytest.mark.parametrize("route", ROUTES[1:])
def test_unknown_kernel_is_404(server, route):
    status, body = server.get(route.format(k="00000000-0000-0000-0000-000000000000"))
    assert status == 404, body
    assert "no kernel 00000000-0000-0000-0000-000000000000" in body["message"]


@pytest.mark.parametrize("route", ROUTES[1:])
def test_non_capsem_kernel_is_explained(server, python_kernel, route):
    status, body = server.get(route.format(k=python_kernel))
    assert status == 200, body
    assert body["capsem"] is False and body["kernel_id"] == python_kernel and body["kernel_name"] == "python3"
    assert "not a capsem kernel" in body["message"]


def test_kernel_list_has_only_capsem_kernels(server, python_kernel):
    assert server.get("/capsem/kernels") == (200, {"kernels": []})


def test_policy_edits_are_off_by_default(server, python_kernel):
    status, body = server.request("PUT", f"/capsem/kernels/{python_kernel}/policy", {"text": "version = 1"})
    assert status == 403
    assert "allow_policy_edits" in body["message"]


def test_event_stream_needs_auth(server, python_kernel):
    host, port = server.url.split("//")[1].rstrip("/").split(":")
    con = http.client.HTTPConnection(host, int(port), timeout=30)
    con.request("GET", f"/capsem/kernels/{python_kernel}/events")
    assert con.getresponse().status == 403
    con.close()

"""The capsem server extension with a real capsem kernel (one VM) in a real Jupyter server: VM facts,
the kernel's policy, its network log and the live event stream, then the kernel going away."""

from __future__ import annotations

import http.client
import json
import os
import time

import pytest

from capsem_vm.proxy.audit import AuditLog
from jupyter_helpers import ServerWorld

pytestmark = pytest.mark.vm

POLICY = """
[[rule]]
name = "pypi-read"
host = "pypi.org"
scheme = "https"
methods = ["GET"]
action = "allow"
reason = "the index"
"""
SERVER_WORLD = ServerWorld("capsem-ui", POLICY, ("--CapsemExtension.poll_interval=0.2",), until_ready=True)


def read_events(server, kernel_id: str, after: int, until, timeout: float = 60) -> list[tuple[str, dict]]:
    """Read the kernel's event stream until `until(events)` is true."""
    host, port = server.url.split("//")[1].rstrip("/").split(":")
    con = http.client.HTTPConnection(host, int(port), timeout=timeout)
    con.request("GET", f"/capsem/kernels/{kernel_id}/events?after={after}",
                headers={"Authorization": f"token {server.token}"})
    resp = con.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    events, name, deadline = [], None, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            line = resp.fp.readline().decode()
            if not line:
                break
            line = line.rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
                if until(events):
                    return events
        raise AssertionError(f"stream ended or timed out; events so far: {events}")
    finally:
        con.close()


def test_vm_facts_of_a_running_capsem_kernel(server_world):
    server, kid = server_world["server"], server_world["kernel"]
    status, facts = server.get(f"/capsem/kernels/{kid}")
    assert status == 200, facts
    assert facts["capsem"] is True and facts["kernel_id"] == kid and facts["kernel_name"] == "capsem-ui"
    assert facts["state"] == "ready", facts
    assert facts["accel"] in ("kvm", "tcg") and facts["accel_label"] in ("KVM", "emulated (TCG)")
    assert (facts["memory_mb"], facts["cpus"]) == (768, 1)
    assert facts["shares"] == [{"path": str(server_world["notebooks"].resolve()), "mode": "rw"}]
    assert facts["image_digest"] and len(facts["image_digest"]) >= 32
    assert 0 < facts["boot_seconds"] < server_world["start_s"] + 1
    assert facts["started_at"] <= facts["ready_at"] <= time.time()
    assert facts["uptime_seconds"] > 0 and facts["kernel_pid"]
    assert facts["policy_path"] == str(server_world["policy"])
    proxy = facts["proxy"]  # its policy allows something: the supervised proxy service serves it
    assert proxy["state"] == "running" and proxy["serving"] == proxy["workers"] >= 1, proxy
    assert server.get("/capsem/kernels") == (200, {"kernels": [{"kernel_id": kid, "state": "ready",
                                                                "accel": facts["accel"]}]})


def test_policy_of_a_capsem_kernel(server_world):
    status, policy = server_world["server"].get(f"/capsem/kernels/{server_world['kernel']}/policy")
    assert status == 200, policy
    assert policy["source"] == str(server_world["policy"]) and policy["edits_allowed"] is False
    rule = next(r for r in policy["rules"] if r["name"] == "pypi-read")
    assert rule["summary"] == "allow GET https://pypi.org" and rule["reason"] == "the index"


def test_network_log_and_live_events(server_world):
    server, kid = server_world["server"], server_world["kernel"]
    log = AuditLog(server_world["audit_db"])
    log.record(kid, "http", method="GET", url="https://pypi.org/simple/", host="pypi.org", port=443, status=200,
               decision="allow", rule="pypi-read")
    log.record(kid, "http", method="GET", url="https://evil.example/x", host="evil.example", port=443, status=403,
               decision="deny", rule="default", reason="no rule allows this (default deny)")
    log.record("another-kernel", "http", method="GET", url="https://x.example/", host="x.example", decision="deny")
    log.flush()
    status, net = server.get(f"/capsem/kernels/{kid}/network")
    assert status == 200, net
    assert [(r["host"], r["decision"], r["path"]) for r in net["rows"]] == [
        ("pypi.org", "allow", "/simple/"), ("evil.example", "deny", "/x")]
    assert (net["total"], net["blocked"]) == (2, 1)
    status, blocked = server.get(f"/capsem/kernels/{kid}/network?blocked=1&host=evil")
    assert [r["host"] for r in blocked["rows"]] == ["evil.example"]
    assert server.get(f"/capsem/kernels/{kid}/network?blocked=1&host=pypi")[1]["rows"] == []
    # ?barrier=1: the server first waits until every row its VMs and proxy workers caused is written
    status, fenced = server.get(f"/capsem/kernels/{kid}/network?barrier=1")
    assert status == 200 and fenced["barrier"] is True and fenced["total"] == 2, fenced

    # the stream starts with the state, then sends rows newer than ?after as they are written
    def got_new_row(events):
        return any(name == "network" for name, _ in events)

    import threading
    threading.Timer(1.5, lambda: (log.record(kid, "dns", method="A", url="tracker.example", host="tracker.example",
                                             decision="deny", rule="default"), log.flush())).start()
    events = read_events(server, kid, net["last_id"], got_new_row)
    assert events[0][0] == "state" and events[0][1]["state"] == "ready"
    rows = [e for name, e in events if name == "network"][0]
    assert [r["host"] for r in rows["rows"]] == ["tracker.example"] and rows["blocked"] == 2
    log.close()


def test_kernel_gone(server_world):
    server, kid = server_world["server"], server_world["kernel"]
    import threading
    threading.Timer(1.0, lambda: server.request("DELETE", f"/api/kernels/{kid}", timeout=120)).start()
    events = read_events(server, kid, 10**9, lambda ev: ev[-1][0] == "gone", timeout=150)
    assert events[-1] == ("gone", {"kernel_id": kid, "state": "dead"})
    assert server.get(f"/capsem/kernels/{kid}")[0] == 404

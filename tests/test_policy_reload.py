"""A running kernel's policy reloaded without a restart (issue 22): Egress.reload_policy puts the
policy file's new text in force in the bridge (DNS and connection decisions) and in every proxy
worker (ProxyService.reload: same SOCKS password, so the bridge keeps its endpoint; the worker
updates the kernel in place, so open connections follow too), records a policy-change audit row,
and a worker restarted after a crash gets the *current* policy, not the one the kernel started with.

Real parts: the egress test world (egress_world.World: HTTPS servers on 127.0.0.1 behind names
the proxy's resolve map knows, the real mitmproxy service with two workers), a kernel's real
Egress on Unix sockets standing in for its vsock ports, and the guest-protocol client.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import signal
import time
from contextlib import asynccontextmanager

import pytest

from egress_world import SECRET, SEEN, World
from proxy_helpers import FakeTransport, Guest

from capsem_vm.config import EgressConfig
from capsem_vm.egress import Egress
from capsem_vm.policy import PolicyError

amark = pytest.mark.asyncio(loop_scope="module")
KID, BARE = "k-reload", "k-reload-bare"
NEW = "new.test.example"


def new_rule(w) -> str:
    return (f'\n[[rule]]\nname = "new-host"\nhost = "{NEW}"\nport = {w.HTTPS}\naddresses = ["127.0.0.1"]\n'
            'action = "allow"\n')


@asynccontextmanager
async def build_world(tmp_path_factory):
    """The world's policy for kernel KID, and a deny-only policy (no proxy) for kernel BARE."""
    tmp = tmp_path_factory.mktemp("policy-reload")
    w = await World.create(tmp, service=False, extra_names=(NEW,))
    w.runtime.service_options["workers"] = 2
    (tmp / "k").mkdir()
    (tmp / "b").mkdir()
    w.transport, w.bare_transport = FakeTransport(tmp / "k"), FakeTransport(tmp / "b")
    w.egress = Egress(EgressConfig(policy=str(w.policy_file), kernel_id=KID), runtime=w.runtime)
    await w.egress.start(w.transport)
    await w.egress._bridge()
    w.bare_file = tmp / "policy" / "bare.toml"
    w.bare_file.write_text('[[rule]]\nname = "nothing"\nhost = "x.test.example"\naction = "deny"\n')
    w.bare = Egress(EgressConfig(policy=str(w.bare_file), kernel_id=BARE), runtime=w.runtime)
    await w.bare.start(w.bare_transport)
    await w.bare._bridge()
    (tmp / "ca.pem").write_text(w.egress._ca_pem)
    w.guest = Guest(w.transport.path(5002), w.transport.path(5003), str(tmp / "ca.pem"))
    w.bare_guest = Guest(w.bare_transport.path(5002), w.bare_transport.path(5003), str(tmp / "ca.pem"))
    yield w
    for e in (w.egress, w.bare):
        await e.close()
    await w.transport.close()
    await w.bare_transport.close()
    await w.close()


def get(guest, host: str, port: int, path: str = "/echo/r"):
    return asyncio.to_thread(guest.http, "GET", host, port, path, tls=True, timeout=15)


def worker_pids(w) -> list[int | None]:
    return [wk.proc.pid if wk.proc is not None and wk.serving else None for wk in w.runtime.service.workers]


@amark
async def test_a_running_kernels_next_request_follows_the_new_policy(world):
    w = world
    refused = await get(w.guest, NEW, w.HTTPS)
    assert refused.reply["t"] == "refused" and refused.reply["code"] == "default-deny", refused.reply
    assert (await asyncio.to_thread(w.guest.dns, NEW))[0] == 3  # NXDOMAIN: no rule can allow the name
    endpoint = w.egress.bridge.proxy

    w.policy_file.write_text(w.policy_text + new_rule(w))
    await w.egress.reload_policy({"url": str(w.policy_file), "rule": "new-host", "host": NEW,
                                  "reason": "rule new-host added by Jupyter user 'alice'; policy reloaded"})
    assert (await asyncio.to_thread(w.guest.dns, NEW))[0] == 0  # the bridge's DNS answers now
    ok = await get(w.guest, NEW, w.HTTPS)
    assert ok.reply["t"] == "connected" and ok.status == 200 and SEEN[-1]["path"] == "/echo/r", ok
    assert w.egress.bridge.proxy is endpoint  # same SOCKS credentials: the bridge kept its endpoint
    row = (await asyncio.to_thread(w.wait_rows, kernel=KID, kind="policy"))[-1]
    assert (row["decision"], row["code"], row["rule"], row["url"]) == \
        ("change", "policy-change", "new-host", str(w.policy_file))
    assert "'alice'" in row["reason"]


@amark
async def test_after_a_worker_kill_the_new_policy_is_still_in_force(world):
    w = world
    assert (await get(w.guest, NEW, w.HTTPS)).status == 200  # the previous test's reload
    pids = worker_pids(w)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    while None in worker_pids(w) or set(worker_pids(w)) & set(pids):
        assert time.monotonic() - t0 < 30, w.runtime.proxy_state()
        await asyncio.sleep(0.02)
    for _ in range(4):  # both new workers: the reloaded policy and the kernel's credential
        r = await get(w.guest, NEW, w.HTTPS)
        assert r.status == 200, r.reply
        s = await asyncio.to_thread(w.guest.http, "GET", "secret.test.example", w.HTTPS, "/echo/c", tls=True)
        assert s.status == 200 and SEEN[-1]["headers"].get("Authorization") == f"Bearer {SECRET}"


@amark
async def test_open_connections_follow_a_narrower_policy(world):
    """A reload that takes a rule away: the next request on a connection opened before it is
    refused by the worker (the kernel's policy is replaced in place, not only for new sessions)."""
    w = world
    s, reply = await asyncio.to_thread(w.guest.open, NEW, w.HTTPS)
    assert reply["t"] == "connected"
    tls = await asyncio.to_thread(w.guest.tls, s, NEW)
    conn = http.client.HTTPConnection(NEW, w.HTTPS, timeout=15)
    conn.sock = tls

    def req(path):
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        return r.status, r.getheader("X-Capsem-Policy") or ""
    assert (await asyncio.to_thread(req, "/echo/one"))[0] == 200
    w.policy_file.write_text(w.policy_text)
    await w.egress.reload_policy()
    status, policy = await asyncio.to_thread(req, "/echo/two")
    conn.close()
    assert status == 403 and "rule=\"default\"" in policy, (status, policy)
    again = await get(w.guest, NEW, w.HTTPS)
    assert again.reply["t"] == "refused" and again.reply["code"] == "default-deny"
    assert (await asyncio.to_thread(w.wait_rows, kernel=KID, kind="policy", reason="policy reloaded"))


@amark
async def test_a_kernel_without_a_proxy_gets_one_when_its_policy_starts_allowing(world):
    w = world
    assert w.bare.service is None and w.bare.bridge.proxy is None
    assert (await get(w.bare_guest, NEW, w.HTTPS)).reply["code"] == "default-deny"
    w.bare_file.write_text(new_rule(w))
    await w.bare.reload_policy()
    assert w.bare.service is not None
    assert (await get(w.bare_guest, NEW, w.HTTPS)).status == 200


@amark
async def test_an_invalid_file_changes_nothing(world):
    w = world
    before = w.egress.policy
    w.policy_file.write_text(w.policy_text + "[[rule]\n")
    with pytest.raises(PolicyError):
        await w.egress.reload_policy()
    w.policy_file.write_text(w.policy_text)
    assert w.egress.policy is before and w.egress.bridge.policy is before
    assert (await get(w.guest, "api.test.example", w.HTTPS, "/echo/still")).status == 200

"""Domain fronting and smuggled WebSockets sent by the guest itself (issue 15, items 1 and 5), from
a real capsem kernel started as Jupyter starts it (KernelManager -> CapsemProvisioner, the
installed kernelspec, the policy from the user's config dir). One kernel VM for the module.

The upstream is the recording "edge" of tests/test_proxy_fixtures.py (a CDN-like server for many
names on one address, routing by absolute-form authority / :authority / Host), on this machine,
reached through the real proxy service. `allowed.test.example` is allowed and carries a credential;
`other.test.example` is not allowed. The guest opens connections to allowed.test.example both
through its proxy variables (CONNECT to the agent's proxy on 127.0.0.1:3128) and with raw sockets
(DNS stub -> synthetic address -> nftables capture), then writes the attacks by hand inside: request
lines in absolute form naming another host, port, userinfo or spelling; Host headers naming another
host or port; a CONNECT inside the tunnel; HTTP/2 :authority/:path; WebSocket upgrades hidden in a
token list and a server's 101 to a plain request. Checked here: what the edge received (nothing, or
origin form with the judged Host), the credential never anywhere else, the audit rows' code.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from egress_world import World  # noqa: E402
from kernel_helpers import KERNEL, capsem_kernelspecs, cell_json, start_kernel, stop_kernel  # noqa: E402,F401
from test_proxy_fixtures import Edge, header_values, routed_name  # noqa: E402

from capsem_kernel import loop_thread  # noqa: E402

pytestmark = pytest.mark.vm
A, OTHER, NOWS = "allowed.test.example", "other.test.example", "nows.test.example"
SECRET = "fronted-vm-" + os.urandom(8).hex()


class Env:
    pass


@pytest.fixture(scope="module")
def k(capsem_kernelspecs, tmp_path_factory):
    e = Env()
    tmp = tmp_path_factory.mktemp("egress-names")
    os.chmod(tmp, 0o755)
    mp = pytest.MonkeyPatch()
    mp.setenv("CAPSEM_NAMES_SECRET", SECRET)  # read by the proxy service when it injects

    def edge_rules(w) -> str:
        e.edge = Edge(w.proxy_python, w.cert_file, w.key_file)
        ports = f"[{e.edge.TLS}, {e.edge.PLAIN}]"
        return f"""
[[rule]]
name = "front"
host = "{A}"
port = {ports}
addresses = ["127.0.0.1"]
action = "allow"
reason = "the fronting edge, under its allowed name"

[[rule]]
name = "nows-edge"
host = "{NOWS}"
port = {ports}
addresses = ["127.0.0.1"]
action = "allow"
reason = "https only: the no-websockets rule above denies ws/wss"

[[credential]]
name = "front"
hosts = ["{A}"]
env = "CAPSEM_NAMES_SECRET"
header = "Authorization"
format = "Bearer {{value}}"
"""
    e.w = w = loop_thread.run_sync(World.create(tmp, extra_policy=edge_rules, extra_names=(A, OTHER)), timeout=180)
    try:
        # the kernelspec names no policy: the user's config dir (World points CAPSEM_CONFIG_DIR there)
        cfg = Path(os.environ["CAPSEM_CONFIG_DIR"])
        cfg.mkdir(mode=0o755, exist_ok=True)
        (cfg / "policy.toml").write_text(w.policy_text)
        os.chmod(cfg / "policy.toml", 0o644)
        e.nb = tmp / "notebook"
        e.nb.mkdir()
        e.km, e.kc = start_kernel(KERNEL, cwd=e.nb)
        e.kid = e.km.kernel_id
        assert e.km.provisioner.kernel_vm.vm.egress.info()["policy"] == str(cfg / "policy.toml")
        print(f"\nkernel start {e.km.capsem_start_s:.1f} s")
        yield e
    finally:
        if hasattr(e, "km"):
            stop_kernel(e.km, e.kc)
        loop_thread.run_sync(w.close(), timeout=60)
        if hasattr(e, "edge"):
            e.edge.close()
        mp.undo()


# What the guest runs: open a connection to host:port through the agent's proxy (CONNECT) or
# directly (captured), TLS or not, write raw bytes, read one response.
GUEST = r'''
import json, os, socket, ssl, time
CTX = ssl.create_default_context()
def via_proxy(host, port):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=60)
    s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        c = s.recv(4096)
        if not c:
            raise ConnectionError("the proxy closed")
        head += c
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(head[:300].decode(errors="replace"))
    return s
def connect(path, host, port, tls, sni=None, alpn=None):
    s = via_proxy(host, port) if path == "proxy" else socket.create_connection((host, port), timeout=60)
    if tls:
        ctx = CTX
        if alpn:
            ctx = ssl.create_default_context(); ctx.set_alpn_protocols(alpn)
        s = ctx.wrap_socket(s, server_hostname=sni or host)
    return s
def response(s, then=None):
    """(status, body) of one response; with `then`, send it after a 101 and report what comes back."""
    buf = b""
    try:
        while b"\r\n\r\n" not in buf:
            c = s.recv(65536)
            if not c:
                return [None, buf[:300].decode(errors="replace")]
            buf += c
        head, _, body = buf.partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1])
        if status == 101:
            try:
                s.sendall(then or b"")
                s.settimeout(3)
                return [101, s.recv(100).decode(errors="replace")]
            except OSError as exc:
                return [101, f"after 101: {type(exc).__name__}"]
        n = [int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")]
        while n and len(body) < n[0]:
            c = s.recv(65536)
            if not c:
                break
            body += c
        return [status, body[:600].decode(errors="replace")]
    except (OSError, ValueError, IndexError) as exc:
        return [None, f"{type(exc).__name__}: {exc}"[:300]]
def h1(path, host, port, raw, tls=True, sni=None, then=None):
    try:
        s = connect(path, host, port, tls, sni)
    except (OSError, ConnectionError) as exc:
        return [None, f"connect: {type(exc).__name__}: {exc}"[:300]]
    try:
        s.sendall(raw)
        return response(s, then)
    finally:
        s.close()
def h2(path, host, port, headers):
    import h2.config, h2.connection, h2.events
    try:
        s = connect(path, host, port, True, alpn=["h2"])
    except (OSError, ConnectionError) as exc:
        return [None, f"connect: {exc}"[:300]]
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False))
    conn.initiate_connection()
    conn.send_headers(1, headers, end_stream=True)
    s.sendall(conn.data_to_send())
    out = [None, ""]
    try:
        while True:
            data = s.recv(65536)
            if not data:
                break
            done = False
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    out[0] = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    out[1] += ev.data.decode(errors="replace")
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    done = True
            s.sendall(conn.data_to_send())
            if done:
                break
    except Exception as exc:
        out[1] += f" {type(exc).__name__}"
    s.close()
    return out
'''

WS = ("Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
      "Sec-WebSocket-Version: 13\r\n")
FRAME = bytes([0x81, 0x82, 0, 0, 0, 0]) + b"hi"


def cases(T: int, P: int) -> list[dict]:
    """Each attack as the guest sends it; `ok` is what must happen: "canonical" (reaches the edge
    in origin form with the judged Host) or a refusal ("host-mismatch", "400", "no-websockets",
    "no-101"). The tag (in the path) ties guest result, edge record and audit row together."""
    ok_host = f"Host: {A}:{T}\r\n"
    c = []

    def get(name, target_prefix, host_lines, ok, tls=True, port=T):
        c.append({"name": name, "kind": "h1", "port": port, "tls": tls, "ok": ok,
                  "raw": f"GET {target_prefix}/x/{{tag}} HTTP/1.1\r\n{host_lines}Connection: close\r\n\r\n"})
    get("control", "", ok_host, "canonical")
    get("absolute, agreeing spelling", f"https://ALLOWED.Test.Example.:{T}", ok_host, "canonical")
    get("absolute other host", f"https://{OTHER}", ok_host, "host-mismatch")
    get("absolute other host, judged port", f"https://{OTHER}:{T}", ok_host, "host-mismatch")
    get("absolute other trailing dot", f"https://{OTHER}.:{T}", ok_host, "host-mismatch")
    get("absolute other punycode", f"https://xn--bcher-kva.test.example:{T}", ok_host, "host-mismatch")
    get("absolute same host, other port", f"https://{A}:{P}", ok_host, "host-mismatch")
    get("absolute ip literal", f"https://127.0.0.1:{T}", ok_host, "host-mismatch")
    get("absolute userinfo", f"https://u:p@{A}:{T}", ok_host, "400")
    get("host other", "", f"Host: {OTHER}:{T}\r\n", "host-mismatch")
    get("host other port", "", f"Host: {A}:{P}\r\n", "host-mismatch")
    get("two hosts", "", f"{ok_host}Host: {OTHER}:{T}\r\n", "host-mismatch")
    get("plain: absolute other host", f"http://{OTHER}:{P}", f"Host: {A}:{P}\r\n", "host-mismatch", tls=False, port=P)
    get("plain: control", "", f"Host: {A}:{P}\r\n", "canonical", tls=False, port=P)
    c.append({"name": "CONNECT inside the tunnel", "kind": "h1", "port": T, "tls": True, "ok": "400",
              "raw": f"CONNECT {OTHER}:443 HTTP/1.1\r\n{ok_host}X-Tag: {{tag}}\r\n\r\n"})
    for name, authority, path in (("h2 :authority other port", f"{A}:{P}", "/x/{tag}"),
                                  ("h2 :authority other host", f"{OTHER}:{T}", "/x/{tag}"),
                                  ("h2 :path absolute", f"{A}:{T}", f"https://{OTHER}:{T}/x/{{tag}}")):
        c.append({"name": name, "kind": "h2", "port": T, "ok": "host-mismatch",
                  "headers": [[":method", "GET"], [":scheme", "https"], [":path", path], [":authority", authority]]})
    for name, upgrade in (("ws token list", "Upgrade: foo, WebSocket\r\n"), ("ws two headers", "Upgrade: h2c\r\nUpgrade: websocket\r\n")):
        c.append({"name": name, "kind": "h1", "host": NOWS, "port": T, "tls": True, "ok": "no-websockets",
                  "raw": f"GET /ws/{{tag}} HTTP/1.1\r\nHost: {NOWS}:{T}\r\n{upgrade}{WS}\r\n"})
    c.append({"name": "101 to a request without Upgrade", "kind": "h1", "host": NOWS, "port": T, "tls": True,
              "ok": "no-101", "raw": f"GET /x/{{tag}}/force101 HTTP/1.1\r\nHost: {NOWS}:{T}\r\n{WS}\r\n"})
    return c


def test_fronting_and_smuggled_websockets_from_the_guest_are_refused(k):
    w, edge = k.w, k.edge
    T, P = edge.TLS, edge.PLAIN
    plan, n = [], 0
    for path in ("proxy", "direct"):
        for case in cases(T, P):
            n += 1
            t = f"g{n}x{os.getpid()}"
            plan.append(dict(case, path=path, tag=t, raw=case.get("raw", "").replace("{tag}", t),
                             headers=[[a, b.replace("{tag}", t)] for a, b in case.get("headers", [])]))
    code = GUEST + f"""
plan = json.loads({json.dumps(json.dumps(plan))})
R = []
for c in plan:
    host = c.get("host", {A!r})
    t0 = time.time()
    if c["kind"] == "h1":
        r = h1(c["path"], host, c["port"], c["raw"].encode("latin-1"), c["tls"], then={FRAME!r})
    else:
        r = h2(c["path"], host, c["port"], [tuple(h) for h in c["headers"]])
    R.append(r + [round(time.time() - t0, 2)])
print(json.dumps(R))
"""
    t0 = time.monotonic()
    results = cell_json(k.kc, code, timeout=600)
    print(f"\n{len(plan)} attacks from the guest in {time.monotonic() - t0:.1f} s")
    time.sleep(1.0)  # anything that would still reach the edge
    failures = []
    for c, (status, body, took) in zip(plan, results):
        got = [r for r in edge.requests() if c["tag"] in (r.get("line") or json.dumps(r["headers"]))]
        what = f'{c["path"]}: {c["name"]}: status {status} ({took} s), edge got {len(got)}: {body[:200]!r}'
        if c["ok"] == "canonical":
            host = f"{A}:{c['port']}"
            cred = [f"Bearer {SECRET}"] if c["tls"] else []
            if not (status == 200 and len(got) == 1 and got[0]["line"] == f"GET /x/{c['tag']} HTTP/1.1"
                    and header_values(got[0], "host") == [host] and header_values(got[0], "authorization") == cred):
                failures.append(what + f" / {got}")
            continue
        if c["ok"] == "no-101":
            # the request itself is allowed (https) and reaches the edge; its 101 never reaches the guest
            conns = {r["conn"] for r in got}
            after = [r for r in edge.records if r.get("event") == "after-101" and r["conn"] in conns]
            if status == 101 or after:
                failures.append(what + f" / after-101 {after}")
            continue
        if got:
            failures.append(what + " (reached the edge)")
            continue
        expected_status = {"host-mismatch": 403, "no-websockets": 403, "400": 400}[c["ok"]]
        if c["kind"] == "h2" or c["name"].startswith("CONNECT"):
            ok = status in (None, 400, 403)
        else:
            ok = status == expected_status and (c["ok"] == "400" or f"code: {c['ok']}" in body
                                                or c["ok"] == "no-websockets")
        if not ok:
            failures.append(what)
    assert not failures, "\n".join(failures)
    # the invariant over everything the edge ever received
    for rec in edge.requests():
        assert routed_name(rec) in (A, NOWS), rec
        assert not header_values(rec, "authorization") or routed_name(rec) == A, rec
    # audited, under this kernel, with the refusal's code
    for c in plan:
        want = {"host-mismatch": "host-mismatch", "no-websockets": "no-websockets", "no-101": "upgrade-mismatch"}.get(c["ok"])
        if want is None:
            continue
        got = w.wait_rows(kernel=k.kid, rule=want, url=lambda u, t=c["tag"]: t in (u or ""))
        assert got and got[0]["decision"] == "deny", (c["path"], c["name"], want)
        # the stable code (the `code` column where the audit log has one; a built-in refusal's
        # rule is its code; no-websockets is a rule of the policy)
        code = "rule-deny" if want == "no-websockets" else want
        assert (got[0].get("code") or code) == code, got[0]
    assert w.wait_rows(kernel=k.kid, rule="host-mismatch", method="CONNECT", decision="deny")

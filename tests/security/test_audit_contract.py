"""The audit contract (docs/AUDIT.md; issue 15 items 6 and 7), host side, through the real path a
guest reaches: the egress bridge's vsock sockets (here their Unix sockets), the real mitmproxy
service with two worker processes, a real HTTP server on 127.0.0.1 standing in for the internet.

- every row carries a stable code; refusals repeated by the guest become rows with counts, at a
  bounded rate, counts never lost;
- the barrier (ProxyService.flush_audit + AuditLog.flush, EgressRuntime.audit_barrier) returns only once
  every row caused before it is written: rows are read at once, without polling;
- guest-chosen text (connect names, DNS names, HTTP paths) is stored, printed by `capsem audit`
  and logged with control characters escaped;
- a size cap rotates the oldest rows out and says so; an older database is migrated in place;
- a database that cannot be written (a full tmpfs mounted here) makes the proxy and the bridge
  refuse egress with code audit-unavailable, and egress comes back when writes work again.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sqlite3
import struct
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web

from capsem_agent import protocol
from capsem_vm.policy import parse_policy
from capsem_vm.policy.codes import CODES
from capsem_vm.proxy import AuditLog, read_events
from capsem_vm.proxy import dns
from capsem_vm.proxy.cli import main as proxy_main
from capsem_vm.proxy.service import find_proxy_python

from proxy_world import ProxyWorld
from proxy_helpers import recv_frame, wait_for

amark = pytest.mark.asyncio(loop_scope="module")

UNSAFE_SAMPLES = ["\x1b[2J\x1b]0;owned\x07", "a\r\nforged 2026-01-01 row", "nul\x00x", "ls\u2028x",
                  "moc.\u202elive", "del\x7f", "c1\x9b31m", "iso\u2066x\u2069"]


# the oracle, written independently of capsem_vm.safetext: C0, DEL, C1, line/paragraph separators,
# bidi marks/embeddings/overrides/isolates, lone surrogates
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _unsafe(text: str) -> bool:
    return bool(_UNSAFE.search(text))


SEEN: list[str] = []  # request targets the server got


class Echo(tornado.web.RequestHandler):
    def get(self):
        SEEN.append(self.request.uri)
        self.write("ok")


def _server():
    socks = tornado.netutil.bind_sockets(0, "127.0.0.1")
    srv = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/.*", Echo)]))
    srv.add_sockets(socks)
    return srv, socks[0].getsockname()[1]


def _policy(port: int):
    return parse_policy(f"""
[[rule]]
name = "ok"
host = "ok.test.example"
port = {port}
paths = ["/ok*"]
addresses = ["127.0.0.1"]
action = "allow"
""", "audit-test.toml")


async def _make_world(tmp: Path, db: Path, *, workers: int = 2) -> ProxyWorld:
    """The real service with kernel k-audit allowed to ok.test.example (a real server); the
    environment (CAPSEM_DATA_DIR, CAPSEM_RUNTIME_DIR under tmp) is set until w.close()."""
    try:
        find_proxy_python()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"proxy venv missing: {exc}")
    w = ProxyWorld(tmp, env={})
    w.db = db
    w.srv, w.port = _server()
    w.on_close(w.srv.stop)
    w.policy = _policy(w.port)
    await w.start({"k-audit": w.policy}, audit_db=db, resolve={"ok.test.example": "127.0.0.1"}, workers=workers)
    w.bridge, w.g = w.bridges["k-audit"], w.guests["k-audit"]
    w.egress, w.dns = w.g.egress_path, w.g.dns_path
    return w


@asynccontextmanager
async def build_world(tmp_path_factory):
    """This module's `world` (conftest.py)."""
    tmp = tmp_path_factory.mktemp("audit")
    w = await _make_world(tmp, tmp / "audit.sqlite3")
    yield w
    await w.close()


async def barrier(w: ProxyWorld) -> None:
    """What a reader does: the proxy workers' half and this process's half (EgressRuntime.audit_barrier)."""
    assert await w.service.flush_audit()
    assert await asyncio.to_thread(w.audit.flush)


def run(fn, *a, **kw):
    return asyncio.to_thread(fn, *a, **kw)


def _raw_dns(labels: list[bytes], qtype: int = dns.TYPE_A) -> bytes:
    wire = b"".join(bytes([len(lbl)]) + lbl for lbl in labels) + b"\x00"
    return dns.HEADER.pack(0x4242, dns.RD, 1, 0, 0, 0) + wire + struct.pack(">HH", qtype, dns.CLASS_IN)


def _dns_exchange(w: ProxyWorld, query: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(w.dns)
        s.sendall(protocol.encode({"t": "dns", "data": protocol.b64(query)}))
        return recv_frame(s)


def _raw_http(w: ProxyWorld, request: bytes) -> bytes:
    """A request written byte for byte (http.client refuses control characters in a path)."""
    s, reply = w.g.open("ok.test.example", w.port)
    with s:
        if reply.get("t") != "connected":
            return json.dumps(reply).encode()
        s.sendall(request)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (socket.timeout, ConnectionError):
            pass
        return out


# --- codes and the barrier ------------------------------------------------------------------------

@amark
async def test_every_row_carries_a_known_code_and_the_barrier_makes_it_readable_at_once(world):
    w = world
    ok = await run(w.g.http, "GET", "ok.test.example", w.port, "/ok")
    assert ok.status == 200
    denied_path = await run(w.g.http, "GET", "ok.test.example", w.port, "/admin")
    assert denied_path.status == 403
    denied_host = await run(w.g.http, "GET", "other.test.example", 80, "/")
    assert denied_host.reply.get("t") == "refused"
    assert await run(w.g.dns, "nx.test.example") is not None
    s, reply = await run(w.g.open, "ok.test.example", 1)  # a port no rule allows
    s.close()
    await barrier(w)  # no polling below: the barrier is the contract
    rows = read_events(w.db, kernel="k-audit")
    assert rows and all(r["code"] in CODES for r in rows), [(r["kind"], r["code"]) for r in rows]
    by = {(r["kind"], r["url"]): r for r in rows}
    assert by[("http", f"http://ok.test.example:{w.port}/ok")]["code"] == "rule-allow"
    assert by[("http", f"http://ok.test.example:{w.port}/admin")]["code"] == "default-deny"
    assert by[("connect", "other.test.example:80")]["code"] == "default-deny"
    assert by[("dns", "nx.test.example")]["code"] == "default-deny"
    assert all(r["node"] == "" and r["count"] >= 1 for r in rows)


@amark
async def test_built_in_refusals_carry_their_own_codes(world):
    """Refusals that no rule decides name themselves: oversized headers (431), malformed first
    frames, invalid host names, addresses no rule names."""
    w = world
    big = await run(w.g.http, "GET", "ok.test.example", w.port, "/ok", headers={"X-Big": "a" * 200_000})
    assert big.status == 431

    def malformed() -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(w.egress)
            s.sendall(struct.pack(">I", 5) + b"{nope")
            return recv_frame(s)
    assert (await run(malformed))["rule"] == "protocol"
    s, reply = await run(w.g.open, "bad_name!.example", 443)
    s.close()
    assert reply["rule"] == "invalid-host"
    await barrier(w)
    codes = {r["code"] for r in read_events(w.db, kernel="k-audit")}
    assert {"header-size", "protocol", "invalid-host"} <= codes, codes


@amark
async def test_allowed_requests_with_any_query_bytes_are_audited(world):
    """An allowed request whose query holds bytes that are not UTF-8 (or escapes of them, or such a
    key) reaches the server: it must have its row, the query kept (escaped), secret-looking keys
    still redacted. Before: redact_url raised on the lone surrogates mitmproxy decodes such bytes
    to, the Audit addon's response hook died, and the request went out with no row at all."""
    w = world
    for i, query in enumerate((b"a=\x80", b"k\xff=v&a=1", b"token=\xc3\x28&b=%ff", b"a=%80\xfe")):
        out = await run(_raw_http, w, b"GET /ok/q" + str(i).encode() + b"?" + query
                        + f" HTTP/1.1\r\nHost: ok.test.example:{w.port}\r\nConnection: close\r\n\r\n".encode())
        assert any(u.startswith(f"/ok/q{i}?") for u in SEEN), (i, SEEN[-3:], out[:300])  # it went out
        assert out.startswith(b"HTTP/1.1 200"), out[:200]
    await barrier(w)
    rows = [r for r in read_events(w.db, kernel="k-audit") if r["kind"] == "http" and "/ok/q" in (r["url"] or "")]
    got = {r["url"].split("?")[0].rsplit("/", 1)[-1]: r for r in rows}
    assert set(got) == {"q0", "q1", "q2", "q3"}, [r["url"] for r in rows]
    assert all(r["decision"] == "allow" and r["status"] == 200 for r in got.values())
    assert got["q0"]["url"].endswith("?a=%80") and "token=REDACTED" in got["q2"]["url"]
    assert not [r for r in rows if _unsafe(r["url"])]


# --- aggregation at a bounded rate ---------------------------------------------------------------

@amark
async def test_repeated_refusals_become_counted_rows_at_a_bounded_rate(world):
    w = world
    await barrier(w)
    start_id = max((r["id"] for r in read_events(w.db)), default=0)
    n = 300

    def flood():
        for i in range(n):
            s, reply = w.g.open("flood.test.example", 443)       # the same refused key, at the bridge
            s.close()
            assert reply["t"] == "refused"
        for i in range(n):                                       # distinct names: new keys each
            s, reply = w.g.open(f"n{i}.flood.test.example", 443)
            s.close()
        for i in range(60):                                      # the same 403, in the proxy workers
            assert w.g.http("GET", "ok.test.example", w.port, "/admin/x").status == 403
    t0 = time.monotonic()
    await run(flood)
    elapsed = time.monotonic() - t0
    await barrier(w)
    rows = [r for r in read_events(w.db, kernel="k-audit") if r["id"] > start_id]
    same = [r for r in rows if r["url"] == "flood.test.example:443"]
    assert sum(r["count"] for r in same) + sum(
        _rate_folded(r, "default-deny") for r in rows if r["code"] == "audit-rate") >= n
    assert len(same) <= 2 + elapsed / 5 + 1, len(same)
    # nothing is lost: every refusal is in some row's count
    total = sum(r["count"] for r in rows if r["decision"] == "deny" and r["kind"] == "connect" or
                r["code"] == "audit-rate")
    assert total >= 2 * n
    proxy_same = [r for r in rows if r["url"] == f"http://ok.test.example:{w.port}/admin/x"]
    assert sum(r["count"] for r in proxy_same) + sum(
        _rate_folded(r, "default-deny") for r in rows if r["code"] == "audit-rate") >= 60
    # the bound (docs/AUDIT.md): per kernel and writer process, burst + rate * t + t / window rows;
    # 3 writer processes here (the bridge's and 2 workers)
    from capsem_vm.proxy.audit_rate import RefusalAggregator
    agg = RefusalAggregator()
    bound = 3 * (agg.burst + agg.rate * (elapsed + 1) + (elapsed + 1) / agg.window + 2)
    assert len(rows) <= bound, (len(rows), bound)
    assert len(rows) < n  # far fewer rows than refusals


def _rate_folded(row: dict, code: str) -> int:
    """How many refusals of `code` an audit-rate row holds (its reason lists them)."""
    for part in row["reason"].split("by code: ", 1)[-1].split(", "):
        name, _, num = part.partition(" ")
        if name == code:
            return int(num)
    return 0


def test_aggregator_never_loses_counts_and_respects_its_bound():
    from hypothesis import given, settings, strategies as st

    from capsem_vm.proxy.audit_rate import RefusalAggregator

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 50), st.floats(0, 0.5)), max_size=400))
    def prop(events):
        agg = RefusalAggregator(rate=5, burst=10, window=1.0, max_keys=16)
        now, out, offered = 0.0, [], {}
        for kernel, host, dt in events:
            now += dt
            row = {"ts": now, "kernel": f"k{kernel}", "kind": "connect", "code": "default-deny",
                   "url": f"h{host}:443", "host": f"h{host}", "port": 443, "decision": "deny"}
            offered[row["kernel"]] = offered.get(row["kernel"], 0) + 1
            r = agg.offer(row, now)
            if r:
                out.append(r)
            out += agg.drain(now)
        out += agg.drain(now + 100, force=True)
        assert agg.pending == 0
        for k, n in offered.items():
            mine = [r for r in out if r["kernel"] == k]
            assert sum(r["count"] for r in mine) == n
            itemised = [r for r in mine if r["code"] != "audit-rate"]
            assert len(itemised) <= agg.burst + agg.rate * now + 1
            assert len(mine) - len(itemised) <= now / agg.window + 2
    prop()


# --- guest text escaped: rows, `capsem audit`, logs --------------------------------------------

@amark
async def test_guest_text_is_stored_printed_and_logged_escaped(world, capsys):
    w = world
    from capsem_vm.proxy.audit_rate import BURST, RATE
    await asyncio.sleep(BURST / RATE)  # a full token bucket: every name below gets its own row
    for text in UNSAFE_SAMPLES:
        s, reply = await run(w.g.open, f"x{text}.example", 443)   # connect names (NUL: a bad frame)
        s.close()
        assert reply["t"] == "refused"
    for text in UNSAFE_SAMPLES:                                    # DNS names, raw label bytes
        await run(_dns_exchange, w, _raw_dns([b"q" + text.encode(), b"example"]))
    await run(_raw_http, w, b"GET /admin/\x1b[31mred\x1b]0;t\x07\x9b HTTP/1.1\r\nHost: ok.test.example\r\n\r\n")
    await run(_raw_http, w, "GET /admin/\u202eevil\u2028x HTTP/1.1\r\nHost: ok.test.example\r\n\r\n".encode())
    await barrier(w)

    rows = read_events(w.db, kernel="k-audit")
    texts = [str(v) for r in rows for v in r.values() if isinstance(v, str)]
    assert not [t for t in texts if _unsafe(t)]
    stored = "\n".join(texts)
    assert "x\\x1b[2J\\x1b]0;owned\\x07.example" in stored       # escaped, still recognisable
    assert "a\\x0d\\x0aforged" in stored and "\\u202e" in stored and "\\u2028" in stored

    capsys.readouterr()
    assert proxy_main(["audit", "--db", str(w.db), "--kernel", "k-audit", "--limit", "1000"]) == 0
    out = capsys.readouterr().out
    assert "\\x1b" in out and not any(_unsafe(line) for line in out.splitlines())
    assert proxy_main(["audit", "--db", str(w.db), "--kernel", "k-audit", "--json"]) == 0
    out = capsys.readouterr().out
    assert not any(_unsafe(line) for line in out.splitlines())

    log = w.log_path.read_text(errors="replace")
    assert not _unsafe(log.replace("\n", "")), [c for c in log if _unsafe(c) and c != "\n"][:5]


def test_capsem_audit_prints_rows_of_an_old_database_escaped(tmp_path, capsys):
    """Rows written raw by an older capsem (before escaping) are still printed safely."""
    db = tmp_path / "old.sqlite3"
    _old_db(db, host="evil\x1b[2J\r\nforged")
    assert proxy_main(["audit", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "evil\\x1b[2J\\x0d\\x0aforged" in out and not any(_unsafe(x) for x in out.splitlines())
    from capsem_kernel.server import network
    shaped = network.query(db, "old-k")
    assert shaped["rows"] and not any(_unsafe(str(v)) for r in shaped["rows"] for v in r.values())


# --- schema migration and the size cap ----------------------------------------------------------

OLD_SCHEMA = """
CREATE TABLE events (id INTEGER PRIMARY KEY, ts REAL NOT NULL, kernel TEXT NOT NULL, kind TEXT NOT NULL,
    method TEXT, url TEXT, host TEXT, port INTEGER, status INTEGER, bytes_out INTEGER, bytes_in INTEGER,
    duration_ms REAL, decision TEXT, rule TEXT, reason TEXT);
CREATE INDEX events_kernel ON events (kernel, id);
"""


def _old_db(db: Path, host: str = "old.example", n: int = 3) -> None:
    con = sqlite3.connect(db)
    con.executescript(OLD_SCHEMA)
    for i in range(n):
        con.execute("INSERT INTO events (ts, kernel, kind, url, host, port, decision, rule, reason) "
                    "VALUES (?, 'old-k', 'connect', ?, ?, 443, 'deny', 'default', 'old row')",
                    (time.time(), f"{host}:443", host))
    con.commit()
    con.close()


def test_an_older_database_gets_the_new_columns_without_losing_rows(tmp_path):
    db = tmp_path / "audit.sqlite3"
    _old_db(db)
    logs = [AuditLog(db), AuditLog(db)]  # two writers migrating at once
    logs[0].record("new-k", "http", url="http://a/", decision="allow", rule="r")
    for log in logs:
        assert log.flush()
        log.close()
    rows = read_events(db)
    assert [r["kernel"] for r in rows] == ["old-k"] * 3 + ["new-k"]
    assert all(r["count"] == 1 and r["node"] == "" for r in rows)
    assert rows[-1]["code"] == "rule-allow" and rows[0]["code"] is None


def test_size_cap_rotates_the_oldest_rows_out_and_says_so(tmp_path):
    db = tmp_path / "audit.sqlite3"
    cap = 2 << 20
    writers = [AuditLog(db, max_bytes=cap), AuditLog(db, max_bytes=cap)]  # two writers share it
    for i in range(24000):
        writers[i % 2].record(f"k{i % 3}", "http", url=f"http://big.example/{i}", decision="allow",
                              rule="r", reason="x" * 300)
        if i % 2000 == 1999:
            for wr in writers:
                assert wr.flush(30)
    for wr in writers:
        assert wr.flush(30)
        wr.close()
    con = sqlite3.connect(db)
    pages, free, page = (con.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_count", "freelist_count", "page_size"))
    con.close()
    chunk = 1000 * 600  # a row here is ~450 bytes with its index entry: one write chunk past the cap
    assert (pages - free) * page <= cap + chunk
    assert os.path.getsize(db) <= cap + 2 * chunk
    rows = read_events(db)
    rotated = [r for r in rows if r["code"] == "audit-rotated"]
    assert rotated and "oldest rows" in rotated[0]["reason"]
    assert any(r["url"] and r["url"].endswith("/23999") for r in rows)
    assert min(r["id"] for r in rows) > 1  # the oldest went first


# --- the database cannot be written: egress refused, never unaudited -----------------------------

@pytest.fixture
def tiny_tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path: Path) -> None:
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


class _Locker:
    """Another process's writer holding the database's write lock (BEGIN EXCLUSIVE) for as long
    as it likes: every capsem writer's BEGIN IMMEDIATE times out ("database is locked")."""

    def __init__(self, db: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sqlite3, sys\n"
             "con = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n"
             "con.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.read()", str(db)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


@amark
@pytest.mark.parametrize("breakage", ["disk-full", "locked"])
async def test_unwritable_database_refuses_egress_with_audit_unavailable_then_recovers(tmp_path, tiny_tmpfs,
                                                                                      breakage):
    w = await _make_world(tmp_path, tiny_tmpfs / "audit.sqlite3", workers=1)
    try:
        assert (await run(w.g.http, "GET", "ok.test.example", w.port, "/ok")).status == 200
        await barrier(w)
        filler = tiny_tmpfs / "filler"
        if breakage == "disk-full":
            await run(_fill, filler)
        else:
            locker = await run(_Locker, w.db)

        def refused_eventually():
            outcomes = []
            for _ in range(60):
                r = w.g.http("GET", "ok.test.example", w.port, "/ok")
                outcomes.append(r.status or r.reply.get("rule"))
                if r.status == 403 and "audit-unavailable" in r.policy:
                    return outcomes
                if r.reply.get("t") == "refused":
                    return outcomes
                time.sleep(0.3)
            return outcomes
        outcomes = await run(refused_eventually)
        assert outcomes[-1] in (403, "proxy", "audit-unavailable"), outcomes
        # from now on nothing gets through while the disk is full: bridge (DNS, connects) or proxy
        for _ in range(5):
            r = await run(w.g.http, "GET", "ok.test.example", w.port, "/ok")
            assert r.status != 200, "egress went through while the audit log cannot be written"
        # the bridge's own writer fails on its own rows (a refusal) and then refuses too
        await run(w.g.dns, "nx.test.example")
        assert not await asyncio.to_thread(w.audit.flush, 5)
        r = await run(w.g.http, "GET", "ok.test.example", w.port, "/ok")
        assert r.reply.get("rule") == "audit-unavailable", r.reply
        assert await run(w.g.dns, "ok.test.example") == (dns.REFUSED, [])
        assert "cannot write" in w.log_path.read_text()

        if breakage == "disk-full":
            filler.unlink()  # space again: writes work, held rows are written, egress comes back
        else:
            await run(locker.release)
        assert await asyncio.to_thread(w.audit.flush, 10)

        def allowed_again():
            r = w.g.http("GET", "ok.test.example", w.port, "/ok")
            return r.status == 200
        assert await run(wait_for, allowed_again, 20)
        await barrier(w)
        rows = read_events(w.db, kernel="k-audit")
        assert any(r["code"] == "audit-unavailable" for r in rows)
        assert "works again" in w.log_path.read_text()
    finally:
        await w.close()


def test_node_field_is_empty_locally_and_settable(tmp_path, monkeypatch):
    db = tmp_path / "audit.sqlite3"
    local = AuditLog(db)
    named = AuditLog(db, node="gpu-7\x1b[2J")               # escaped like any text
    monkeypatch.setenv("CAPSEM_NODE", "ray-node-3")
    from_env = AuditLog(db)
    for log, k in ((local, "a"), (named, "b"), (from_env, "c")):
        log.record(k, "http", url="http://x/", decision="allow", rule="r")
        assert log.flush()
        log.close()
    assert {r["kernel"]: r["node"] for r in read_events(db)} == {"a": "", "b": "gpu-7\\x1b[2J", "c": "ray-node-3"}

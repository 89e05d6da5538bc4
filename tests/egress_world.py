"""The "internet" for egress tests (no tests here): real servers on 127.0.0.1 standing in for the
outside, a test CA the proxy service trusts for them, a policy with explicit rules for their
names, a tiny package index serving a wheel built here, and the shared proxy service.

Names (the proxy service resolves them to 127.0.0.1 through its static `resolve` map):
    api.test.example      HTTP + HTTPS echo app (GET/POST /echo*, /big, /ws WebSocket, /admin denied)
    nows.test.example     the same HTTPS app, WebSockets denied by rule
    secret.test.example   the same HTTPS app; a credential is injected for it
    pypi.test.example     HTTPS "simple" index with one wheel (capsem-hello 1.0)
    h2.test.example       an HTTP/2-only TLS server (h2, run with the proxy venv's Python)
    jupyter.test.example  a Jupyter-server-like app: allowed by name, but loopback is not named
and a server on 127.0.0.1 (JUPYTER port) that no rule allows by address.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import ssl
import subprocess
import time
import zipfile
from pathlib import Path

import tornado.httpserver
import tornado.netutil
import tornado.web
import tornado.websocket

from proxy_helpers import H2_SERVER, make_ca, make_leaf, write_pem

SECRET = "s3cr3t-" + os.urandom(8).hex()
NAMES = ("api.test.example", "nows.test.example", "secret.test.example", "pypi.test.example",
         "h2.test.example", "jupyter.test.example")
WHEEL_NAME = "capsem_hello-1.0-py3-none-any.whl"

SEEN: list[dict] = []  # requests the echo app saw (what really reached "the internet")


# --- the apps -------------------------------------------------------------------------------------

class Echo(tornado.web.RequestHandler):
    SUPPORTED_METHODS = ("GET", "POST", "PUT", "DELETE", "HEAD")

    def _do(self):
        info = {"method": self.request.method, "path": self.request.uri,
                "headers": dict(self.request.headers), "body_len": len(self.request.body),
                "body_sha": hashlib.sha256(self.request.body).hexdigest()}
        SEEN.append(info)
        self.set_header("Content-Type", "application/json")
        self.set_header("X-Echo-Auth", self.request.headers.get("Authorization", ""))
        self.write(json.dumps(info))

    get = post = put = delete = _do


class Big(tornado.web.RequestHandler):
    async def get(self):
        n = min(int(self.get_argument("n")), 1 << 30)
        self.set_header("Content-Length", str(n))
        chunk = b"x" * 262144
        while n > 0:
            part = chunk[:n]
            self.write(part)
            await self.flush()
            n -= len(part)


class WsEcho(tornado.websocket.WebSocketHandler):
    def on_message(self, message):
        self.write_message("echo:" + message)


class Simple(tornado.web.RequestHandler):
    def initialize(self, wheel: bytes):
        self.wheel = wheel

    def get(self, name):
        name = name.strip("/")
        if name == "":
            self.write('<html><body><a href="/simple/capsem-hello/">capsem-hello</a></body></html>')
        elif name == "capsem-hello":
            sha = hashlib.sha256(self.wheel).hexdigest()
            self.write(f'<html><body><a href="/files/{WHEEL_NAME}#sha256={sha}">{WHEEL_NAME}</a></body></html>')
        else:
            raise tornado.web.HTTPError(404)


class Files(tornado.web.RequestHandler):
    def initialize(self, wheel: bytes):
        self.wheel = wheel

    def get(self, name):
        if name != WHEEL_NAME:
            raise tornado.web.HTTPError(404)
        self.set_header("Content-Type", "application/octet-stream")
        self.write(self.wheel)


class JupyterLike(tornado.web.RequestHandler):
    def get(self, _=None):
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps({"version": "2.0.0", "note": "a Jupyter server the guest must never reach"}))


def app(wheel: bytes):
    return tornado.web.Application([
        (r"/big", Big), (r"/ws.*", WsEcho),
        (r"/simple/(.*)", Simple, {"wheel": wheel}), (r"/files/(.*)", Files, {"wheel": wheel}),
        (r"/.*", Echo)])


def start_server(application, ssl_ctx=None):
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server = tornado.httpserver.HTTPServer(application, ssl_options=ssl_ctx, max_header_size=1 << 20)
    server.add_sockets(sockets)
    return server, sockets[0].getsockname()[1]


def build_wheel() -> bytes:
    """A minimal pure-Python wheel: capsem_hello 1.0 (module capsem_hello with GREETING)."""
    dist = "capsem_hello-1.0.dist-info"
    files = {
        "capsem_hello/__init__.py": b"GREETING = 'hello from a wheel served by the test index'\n",
        f"{dist}/METADATA": b"Metadata-Version: 2.1\nName: capsem-hello\nVersion: 1.0\n",
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: capsem-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for path, data in files.items():
            z.writestr(path, data)
    return buf.getvalue()


# --- the world ------------------------------------------------------------------------------------

class World:
    """Build with `await World.create(tmp)` on the test's event loop; `await w.close()` at the end."""

    @classmethod
    async def create(cls, tmp: Path, *, service: bool = True, extra_policy=None,
                     extra_names: tuple[str, ...] = (), extra_resolve: dict[str, str] | None = None) -> "World":
        """extra_policy(w) -> TOML appended to the policy, called once the test CA, the leaf
        certificate (w.cert_file, w.key_file) and w.proxy_python exist; extra_names resolve to
        127.0.0.1 like NAMES; extra_resolve maps further names to other addresses."""
        import asyncio

        from capsem_vm.policy import parse_policy
        from capsem_vm.egress_runtime import EgressRuntime, set_process_runtime
        from capsem_vm.proxy.service import find_proxy_python

        w = cls()
        w.tmp = tmp
        w.env_before = {k: os.environ.get(k) for k in ("CAPSEM_DATA_DIR", "CAPSEM_CONFIG_DIR", "CAPSEM_TEST_SECRET")}
        os.environ["CAPSEM_DATA_DIR"] = str(tmp / "data")
        os.environ["CAPSEM_CONFIG_DIR"] = str(tmp / "config")  # empty: no user policy
        os.environ["CAPSEM_TEST_SECRET"] = SECRET
        ca_key, ca_cert = make_ca("capsem egress test upstream CA")
        w.upstream_ca = write_pem(tmp / "upstream-ca.pem", cert=ca_cert)
        leaf_key, leaf = make_leaf(ca_key, ca_cert, ["*.test.example", "test.example"], ["127.0.0.1"])
        w.cert_file, w.key_file = write_pem(tmp / "leaf.pem", cert=leaf), write_pem(tmp / "leaf.key", key=leaf_key)
        sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        sctx.load_cert_chain(w.cert_file, w.key_file)
        w.wheel = build_wheel()
        a = app(w.wheel)
        w.servers = []
        for attr, ctx in (("HTTP", None), ("HTTPS", sctx)):
            srv, port = start_server(a, ctx)
            w.servers.append(srv)
            setattr(w, attr, port)
        srv, w.JUPYTER = start_server(tornado.web.Application([(r"/(.*)", JupyterLike)]))
        w.servers.append(srv)
        w.proxy_python = find_proxy_python()
        w.h2 = subprocess.Popen([w.proxy_python, "-c", H2_SERVER, w.cert_file, w.key_file],
                                stdout=subprocess.PIPE, text=True)
        w.H2 = int(await asyncio.to_thread(w.h2.stdout.readline))

        w.policy_text = f"""
[[rule]]
name = "admin"
host = "api.test.example"
paths = ["/admin*"]
action = "deny"
reason = "admin is off limits"

[[rule]]
name = "api"
host = "api.test.example"
port = [{w.HTTP}, {w.HTTPS}]
methods = ["GET", "POST"]
paths = ["/echo*", "/big*", "/ws*", "/dns-query*"]
addresses = ["127.0.0.1"]
action = "allow"
reason = "the test API"

[[rule]]
name = "no-websockets"
host = "nows.test.example"
scheme = ["ws", "wss"]
action = "deny"
reason = "no websockets here"

[[rule]]
name = "nows"
host = "nows.test.example"
port = {w.HTTPS}
addresses = ["127.0.0.1"]
action = "allow"

[[rule]]
name = "secret-api"
host = "secret.test.example"
port = {w.HTTPS}
addresses = ["127.0.0.1"]
action = "allow"

[[rule]]
name = "pypi"
host = "pypi.test.example"
port = {w.HTTPS}
methods = ["GET"]
addresses = ["127.0.0.1"]
action = "allow"
reason = "the test package index, read-only"

[[rule]]
name = "h2"
host = "h2.test.example"
port = {w.H2}
paths = ["/h2/*"]
addresses = ["127.0.0.1"]
action = "allow"

[[rule]]
name = "jupyter"
host = "jupyter.test.example"
port = {w.JUPYTER}
action = "allow"
reason = "allowed by name, but it resolves to loopback and no rule names that address"

[[credential]]
name = "svc"
hosts = ["secret.test.example"]
env = "CAPSEM_TEST_SECRET"
header = "Authorization"
format = "Bearer {{value}}"
query = "key"
guest_env = "SVC_TOKEN"
"""
        if extra_policy is not None:
            w.policy_text += extra_policy(w)
        w.policy_file = tmp / "policy" / "egress-test.toml"
        w.policy_file.parent.mkdir(mode=0o755)
        w.policy_file.write_text(w.policy_text)
        os.chmod(w.policy_file, 0o644)
        w.policy = parse_policy(w.policy_text, str(w.policy_file))
        w.audit_db = tmp / "data" / "audit.sqlite3"
        # the world's own egress runtime (its audit log in this data dir), used by the VMs and
        # provisioners of this process until close()
        resolve = {n: "127.0.0.1" for n in NAMES + tuple(extra_names)} | (extra_resolve or {})
        w.runtime = EgressRuntime(upstream_ca=w.upstream_ca, resolve=resolve, header_timeout=30.0,
                                  log_path=tmp / "proxy.log", workers=1)
        w.runtime_before = set_process_runtime(w.runtime)
        w.service = await w.runtime.proxy() if service else None
        return w

    def rows(self, **match) -> list[dict]:
        """Audit rows (all kernels) matching every field (a callable field value is a predicate)."""
        from capsem_vm.proxy.audit import read_events
        self.runtime.audit.flush()
        if not self.audit_db.exists():
            return []
        return [r for r in read_events(self.audit_db, limit=100000) if all(
            (v(r[k]) if callable(v) else r[k] == v) for k, v in match.items())]

    def wait_rows(self, timeout: float = 15.0, **match) -> list[dict]:
        """rows(**match), waiting up to `timeout` s for them: audit rows are written asynchronously
        (the bridge may record a refusal just after the guest has read it)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.rows(**match)
            if got or time.monotonic() > deadline:
                return got
            time.sleep(0.3)

    async def close(self) -> None:
        from capsem_vm.egress_runtime import set_process_runtime
        set_process_runtime(self.runtime_before)
        await self.runtime.close()
        self.h2.kill()
        self.h2.wait()
        for s in self.servers:
            s.stop()
        for k, v in self.env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

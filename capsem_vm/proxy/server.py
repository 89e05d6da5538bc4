"""The proxy service process: `python -m capsem_vm.proxy.server` (started by service.ProxyService).

mitmproxy runs here as a library, on this process's own event loop, in SOCKS5 mode on 127.0.0.1
(random port), with only the stock addons it needs (core, proxy server, protocol detection, TLS)
plus capsem's. stdin/stdout carry capsem frames from/to the parent:

    parent -> {"t":"start", audit_db, ca_dir, upstream_ca, resolve, header_timeout, idle_timeout,
               max_header_bytes, listen_host}
           <- {"t":"ready","socks":[host,port]} | {"t":"fatal","message":...}
    parent -> {"t":"register","id",kernel,password,policy,source} <- {"t":"ok","id"} | error
              (again, same password: a reload; the kernel's open connections follow the new policy)
    parent -> {"t":"unregister","id",kernel}                       <- {"t":"ok","id"}
    parent -> {"t":"flush","id"}   <- {"t":"ok","id","written":bool} once every audit row recorded
    parent -> {"t":"ping","id"}    <- {"t":"ok","id"}  (answered on the proxy's loop: the supervisor's liveness check)
                                      before it is written (the audit barrier, docs/AUDIT.md)
    parent -> {"t":"stop"} or EOF: shut down
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import os
import signal
import ssl
import sys
import tempfile
from pathlib import Path

from capsem_agent import protocol

from ..policy import PolicyError, parse_policy
from .audit import AuditLog
from .ca import ensure_ca
from . import tuning

log = logging.getLogger("capsem.proxy")


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def host_trust_bundle(extra_ca: str | None, directory: Path) -> str:
    """The host's trust store (what OpenSSL on this host trusts), plus an extra CA if given."""
    paths = ssl.get_default_verify_paths()
    candidates = [paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt",
                  "/etc/pki/tls/certs/ca-bundle.crt"]
    system = next((p for p in candidates if p and os.path.isfile(p)), None)
    if system is None:
        import certifi  # mitmproxy's own dependency: last resort
        system = certifi.where()
    if not extra_ca:
        return system
    fd, bundle = tempfile.mkstemp(prefix="trust-", suffix=".pem", dir=directory)
    with os.fdopen(fd, "wb") as f:
        f.write(Path(system).read_bytes() + b"\n" + Path(extra_ca).read_bytes())
    return bundle


class Control:
    """Registers kernels on request of the parent; reports readiness."""

    def __init__(self, state, out):
        self.state = state
        self.out = out
        self.ready = asyncio.Event()

    def running(self):
        self.ready.set()

    def handle(self, msg: dict) -> dict:
        from .addons.state import Kernel
        t, mid = msg.get("t"), msg.get("id")
        if t == "register":
            kernel = protocol.req_str(msg, "kernel", max_len=199)
            password = protocol.req_str(msg, "password", max_len=255)
            try:
                policy = parse_policy(protocol.req_str(msg, "policy", max_len=1 << 20) or "",
                                      protocol.req_str(msg, "source", optional=True) or "<registered>")
            except PolicyError as exc:
                return protocol.error("policy", str(exc), mid)
            if msg.get("observe") is True:  # set by the kernel's config, not only by the file
                policy = dataclasses.replace(policy, observe=True)
            known = self.state.kernels.get(kernel)
            if known is not None and known.check(password):
                known.policy = policy  # a reload: its open connections follow the new policy too
            else:
                self.state.kernels[kernel] = Kernel(kernel, password, policy)
            return {"t": "ok", "id": mid}
        if t == "unregister":
            kernel = protocol.req_str(msg, "kernel", max_len=199)
            self.state.kernels.pop(kernel, None)
            # why: open connections of a gone kernel must not outlive it
            for cid, sess in list(self.state.sessions.items()):
                if sess.kernel.id == kernel:
                    self.state.sessions.pop(cid, None)
            return {"t": "ok", "id": mid}
        if t == "ping":
            return {"t": "ok", "id": mid}
        return protocol.error("unknown", f"unknown request {t!r}", mid)


async def _stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=protocol.MAX_FRAME + 16)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    return reader


async def _read_msg(reader: asyncio.StreamReader) -> dict | None:
    """The parent's next request; None at EOF or on a broken frame (both end the service)."""
    try:
        return await protocol.read_message(reader)
    except (EOFError, protocol.FrameError, protocol.MessageError):
        return None


async def run(out) -> int:
    send = _sender(out)
    reader = await _stdin_reader()
    cfg = await _read_msg(reader)
    if not cfg or cfg.get("t") != "start":
        send({"t": "fatal", "message": "expected a start frame"})
        return 2
    try:
        # the first mitmproxy import: its version gate refuses an unknown mitmproxy with a message
        from . import mitm_patches  # noqa: F401
        ca, trust, audit_log = _prepare(cfg)
    except Exception as exc:  # report any setup failure to the parent, then exit
        send(_fatal(exc))
        return 2
    master, control = _build_master(cfg, ca, trust, audit_log, out)
    master_task = asyncio.ensure_future(master.run())
    try:
        addrs = await _listening(master, control)
    except Exception as exc:
        send(_fatal(exc))
        master.shutdown()
        return 2
    # SIGTERM (also what PR_SET_PDEATHSIG sends) shuts down like EOF: queued audit rows get written
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, reader.feed_eof)
    tuning.quiet_gc()  # everything so far lives as long as the service
    send({"t": "ready", "socks": [addrs[0][0], addrs[0][1]]})
    log.info("proxy service ready on %s:%s", addrs[0][0], addrs[0][1])
    await _serve(reader, control, audit_log, send)
    master.shutdown()
    try:
        await asyncio.wait_for(master_task, 10)
    except (asyncio.TimeoutError, Exception):
        pass
    audit_log.close()
    return 0


# --- the steps of run ---------------------------------------------------------------------------

def _sender(out):
    def send(msg: dict) -> None:
        out.write(protocol.encode(msg))
        out.flush()
    return send


def _fatal(exc: BaseException) -> dict:
    return {"t": "fatal", "message": f"{exc.__class__.__name__}: {exc}"}


def _prepare(cfg: dict):
    """What the service needs on disk: the CA, the upstream trust bundle, the audit log."""
    ca = ensure_ca(Path(cfg["ca_dir"]) if cfg.get("ca_dir") else None)
    workdir = Path(tempfile.mkdtemp(prefix="capsem-proxy-"))
    trust = host_trust_bundle(cfg.get("upstream_ca"), workdir)
    audit_log = AuditLog(cfg.get("audit_db"), max_bytes=cfg.get("audit_max_bytes"), node=cfg.get("node"))
    return ca, trust, audit_log


def _build_master(cfg: dict, ca, trust: str, audit_log: AuditLog, out):
    """mitmproxy's Master with its patches, the stock addons it needs and capsem's, configured for
    SOCKS5 on `listen_host`. Returns (master, control)."""
    from mitmproxy import options
    from mitmproxy.addons import core, disable_h2c, next_layer, proxyserver, tlsconfig
    from mitmproxy.master import Master

    from . import mitm_patches
    from .addons.audit import Audit
    from .addons.auth import KernelAuth
    from .addons.credentials import Credentials
    from .addons.guard import Guard
    from .addons.limits import Limits
    from .addons.state import State
    from .addons.streams import Streams

    state = State(cfg.get("resolve") or {})
    audit = Audit(audit_log, state)
    state.audit = audit
    control = Control(state, out)
    opts = options.Options()
    master = Master(opts)
    limits = Limits(state)
    # every patch of mitmproxy internals, in one call, before any addon or connection exists
    mitm_patches.apply(master, idle_timeout=int(cfg.get("idle_timeout") or 600),  # idle connections close
                       header_limit=limits.max_header_bytes, on_header_refused=limits.header_too_large)
    master.addons.add(
        core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(), tlsconfig.TlsConfig(),
        disable_h2c.DisableH2C(),
        KernelAuth(state), limits, Guard(state, audit), Credentials(state), Streams(), audit, control,
    )
    host = cfg.get("listen_host") or "127.0.0.1"
    opts.update(
        mode=[f"socks5@{host}:0"],
        confdir=str(ca.confdir),
        ssl_verify_upstream_trusted_ca=trust,
        ssl_insecure=False,
        connection_strategy="eager",
        http2=True, websocket=True, rawtcp=True, http3=False,
        upstream_cert=True,
        capsem_header_timeout=float(cfg.get("header_timeout") or 30.0),
        capsem_max_header_bytes=int(cfg.get("max_header_bytes") or 65536),
    )
    return master, control


async def _listening(master, control: Control) -> list:
    """The listener's addresses, once mitmproxy runs (at most 30 s)."""
    await asyncio.wait_for(control.ready.wait(), 30)
    addrs = master.addons.get("proxyserver").listen_addrs()
    if not addrs:
        raise RuntimeError("mitmproxy did not open its listener")
    return addrs


async def _serve(reader: asyncio.StreamReader, control: Control, audit_log: AuditLog, send) -> None:
    """Answer the parent's requests until stop or EOF; flushes run beside the others."""
    async def flush(mid) -> None:
        # in a thread: the writer may wait on the database; the proxy's loop must not
        written = await asyncio.to_thread(audit_log.flush)
        send({"t": "ok", "id": mid, "written": written})

    flushes: set[asyncio.Task] = set()
    while True:
        msg = await _read_msg(reader)
        if msg is None or msg.get("t") == "stop":
            break
        if msg.get("t") == "flush":
            task = asyncio.ensure_future(flush(msg.get("id")))
            flushes.add(task)
            task.add_done_callback(flushes.discard)
            continue
        try:
            reply = control.handle(msg)
        except protocol.MessageError as exc:
            reply = protocol.error("bad-request", str(exc), msg.get("id"))
        send(reply)


def main() -> int:
    _die_with_parent()
    # stdout belongs to the control channel: keep a private handle, point fd 1 at stderr
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=os.environ.get("CAPSEM_PROXY_LOG", "WARNING"), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    profile_dir = os.environ.get("CAPSEM_PROXY_PROFILE")
    if profile_dir:  # a developer's switch (bench/proxy.py): cProfile of this worker, written at stop
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            return tuning.event_loop_runner()(run(out))
        finally:
            profiler.disable()
            profiler.dump_stats(os.path.join(profile_dir, f"proxy-{os.getpid()}.prof"))
    return tuning.event_loop_runner()(run(out))


if __name__ == "__main__":
    sys.exit(main())

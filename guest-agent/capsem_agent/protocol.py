"""The capsem control protocol: sans-IO framing and message validation (stdlib only).

Shared verbatim by the guest agent and the host. Both sides treat the other's bytes as hostile:
every frame is bounded, every message is validated before use.

Wire format (all vsock streams of capsem that carry control data):

    frame   = length (4 bytes, big-endian, unsigned) || body (length bytes)
    body    = UTF-8 JSON object with a string field "t" (the message type)
    0 < length <= MAX_FRAME (1 MiB)

Binary payloads (process output, stdin) travel base64-encoded in the "data" field.

Port map (vsock, all within 5000-5005):

    5000  control   guest -> host   the agent connects to the host (CID 2) at boot, sends "hello";
                                    the host accepts exactly one control connection per VM
    5001  channels  host -> guest   one stream per ZMQ TCP connection; first frame is
                                    {"t": "channel", "name": <shell|iopub|stdin|control|hb>},
                                    raw ZMTP bytes follow in both directions
    5002  egress    guest -> host   one stream per captured TCP connection (transparent nftables
                                    capture or the guest's local proxy). First frame, guest -> host:
                                    {"t": "connect", "host": <name or IP literal the program asked
                                    for; a synthetic address from 5003 is fine>, "port": 1..65535},
                                    at most 4 KiB, within 10 s. The guest may send payload right
                                    after it (no need to wait). The host answers exactly one frame:
                                    {"t": "connected"} -> raw bytes follow both ways (half-close
                                    is forwarded); or {"t": "refused", "reason": str, "rule": str,
                                    "code": str (stable: capsem_vm/policy/codes.py)}
                                    -> the host closes (a proxy client should see HTTP 403 / a
                                    transparent one a reset). Denials inside an accepted stream
                                    are HTTP 403s with an X-Capsem-Policy header, or resets.
                                    TLS inside is intercepted: trust the capsem CA.
    5003  dns       guest -> host   DNS over frames, any number per stream, answered in order:
                                    {"t": "dns", "data": b64(query)} -> {"t": "dns", "data":
                                    b64(answer)} or {"t": "dns", "drop": true} (unanswerable).
                                    Allowed names get a synthetic IPv4 (198.18.0.0/15) that maps
                                    back to the name on 5002; AAAA/other types an empty NOERROR;
                                    names the policy never allows NXDOMAIN. Queries <= 1 KiB;
                                    rate-limited (REFUSED above ~100/s).
    5004  reserved
    5005  reserved

Control messages (host requests carry an integer "id"; replies and events repeat it):

    guest -> host
      hello       {v, agent, boot: {kernel_s, init_s, agent_s}}       once, first frame; boot
                                                                        values are guest uptimes
                                                                        (s) or null if unknown:
                                                                        /init started, /init
                                                                        handed over, hello sent;
                                                                        optional extra steps:
                                                                        python_s (agent code
                                                                        runs), imports_s (service
                                                                        modules imported)
      ok          {id, ...}                                             request succeeded
      error       {id?, code, message}                                  request failed / bad frame
      pong        {id}
      started     {id, pid}                                             exec started
      out         {id, fd: 1|2, data: b64}                              exec output (<= 64 KiB raw
                                                                        per frame; pty output is fd 1)
      exit        {id, code, signal}                                    exec finished; exactly one
                                                                        of code/signal is non-null
      kernel_exit {pid, code, signal, tail}                             the Jupyter kernel died;
                                                                        tail = last 8 KiB of its
                                                                        own stdout/stderr (text)

    host -> guest
      ping        {id}                                                  -> pong
      exec        {id, argv: [str], cwd?, env?: {str: str}, stdin?: bool, pty?: bool,
                   rows?, cols?, uid?, gid?}                            -> started, out*, exit
                                                                        (or error spawn_failed)
      stdin       {id, data?: b64, eof?: bool}                          no reply unless error;
                                                                        eof is ignored for a pty
      resize      {id, rows, cols}                                      pty exec only; no reply
                                                                        unless error
      signal      {id, target: int (exec id) | "kernel", signum}        -> ok; sent to the whole
                                                                        process group
      mount       {id, tag, path, readonly?: bool, wait?: int}          -> ok; VirtioFS, nosuid,nodev;
                                                                        wait: seconds (<= 25) for a
                                                                        hot-plugged device to show
      kernel_start{id, key, signature_scheme, cwd, env?, uid?, gid?,    -> ok {id, pid, warm: bool,
                   hold?: bool}                                         listening: bool} one kernel
                                                                        at a time: wait for
                                                                        kernel_exit first;
                                                                        listening: it already runs
                                                                        (preinit): connect at once,
                                                                        the relay holds channels
                                                                        until it took this key;
                                                                        hold: cwd need not exist
                                                                        yet, shell requests but
                                                                        kernel_info wait for
                                                                        kernel_release (preinit
                                                                        only, else cannot_hold)
      kernel_release {id}                                               -> ok: a held kernel changes
                                                                        to its cwd and handles its
                                                                        requests (not_held if none)
      egress_setup {id, ca_pem: str, env?: {str: str}}                  -> ok {id, proxy, dns,
                                                                        capture, seconds}: see below
      egress_prepare {id, ca_pem?: str}                                 -> ok {id, seconds, steps}:
                                                                        egress_setup's listeners and
                                                                        network plumbing (and the
                                                                        CA, if given) ahead of time
                                                                        (no env)
      kernel_prewarm {id, wait?: int, preinit?: bool}                   -> ok {id, pid, ready?}: start a
                                                                        process that imports
                                                                        ipykernel now, so the next
                                                                        kernel_start is fast (also
                                                                        at boot with kernel cmdline
                                                                        capsem.prewarm=1); with
                                                                        wait (s), reply once its
                                                                        imports are done (ready);
                                                                        preinit: the kernel app is
                                                                        also initialised (ipykernel_host.py)
      reclaim     {id}                                                  -> ok {id, seconds, free_kb_before,
                                                                        free_kb_after, errors}: drop
                                                                        clean caches and compact, so
                                                                        free page reporting returns
                                                                        the memory (reclaim.py)
      file        {id, op, root: abs path, path: relative, ...}         -> ok {id, ...}: files beneath
                                                                        root (the share), no link
                                                                        ever followed (files_op.py):
                   op read   {offset?, length <= 512 KiB}               -> {size, data: b64, eof}
                   op write  {offset?, data: b64 <= 512 KiB,            -> {size}
                              truncate?, parents?}
                   op list   {after?: name}                             -> {entries: [{name, type,
                                                                        size, mode, mtime}], more,
                                                                        skipped}: sorted by name,
                                                                        more: ask again after the
                                                                        last name
                   op stat / mkdir {parents?} / remove                  -> {type, size, mode, mtime}
                                                                        / {created} / {}
      shutdown    {id}                                                  -> ok, then the agent ends
                                                                        and the VM powers off

    egress_setup: send it after hello and before kernel_start (the host waits for ok). The agent
    trusts ca_pem (PEM certificates only; a private key is refused) in the system bundle, starts
    a DNS stub on 127.0.0.1:53 (UDP+TCP, forwarded over one 5003 stream), an HTTP proxy on
    127.0.0.1:3128 (CONNECT and absolute-form requests become 5002 streams naming the host) and
    a capture listener on 127.0.0.1:15001 (nftables redirects every other outgoing TCP
    connection there; its SO_ORIGINAL_DST becomes the 5002 connect host), and adds a dummy
    device with an IPv4 default route; DNS over UDP to any outside resolver is redirected to the
    stub; other UDP, ICMP, raw IP and IPv6 to the outside are dropped (senders get EPERM /
    ENETUNREACH). Replies "proxy" (URL), "dns" and "capture" (ip:port), "seconds" (time taken)
    and "steps" ({name: seconds}). Error code egress_failed when the network plumbing fails.
    Idempotent. When a guest client ends its side, the agent half-closes the 5002 stream and
    closes it fully once the host's side has been silent for 10 s (vhost-device-vsock drops
    half-closes, so the host would otherwise hold the stream until its own timeouts). From then on every exec/kernel environment also has HTTP_PROXY,
    HTTPS_PROXY, http_proxy, https_proxy, NO_PROXY, no_proxy, SSL_CERT_FILE, REQUESTS_CA_BUNDLE,
    PIP_CERT, CURL_CA_BUNDLE, NODE_EXTRA_CA_CERTS and the request's env (e.g. credential
    placeholders).

    exec/kernel environment: a clean base (PATH, HOME of the uid, LANG=C.UTF-8, TERM, and the
    egress variables once egress_setup succeeded) overlaid with the request's env; with uid set, supplementary groups are cleared and gid defaults to
    the user's primary group. The kernel's HMAC key is only ever written to a 0600 connection
    file in a 0700 directory owned by the kernel's user.

Error codes: bad_frame (the stream then closes: in the VM the agent ends and the VM powers
off), bad_message, unknown_type, duplicate_id, too_many (64 running execs), spawn_failed,
stdin_overflow (more than 1 MiB of stdin not yet taken by the process; that data is dropped),
kernel_running, no_kernel, no_process, timeout, os_error, egress_failed, cannot_hold, not_held,
internal; for file requests also path_refused (a link, '..', '.' or empty component), not_found,
not_a_file, not_a_dir, too_large.

Channel streams (5001) get no reply frame: after the first frame the agent connects to the
kernel's port (waiting up to 120 s while the kernel is alive but not yet listening) and relays
raw bytes; it closes the stream when no kernel runs, on a bad first frame (which must arrive
within 10 s and be at most 4 KiB), and when the kernel exits. At most 64 streams at once.

Primed channel streams (a pooled VM's host opens them before any kernel_start): first frame
{"t": "channel", "name": .., "prime": true}, then the 64 bytes of ZMTP_GREETING. If a
pre-started kernel is warm (kernel_prewarm {preinit}), the agent joins the stream to its spare
connection for that channel and passes the greeting at once, so the kernel's ZMTP greeting and
READY come back before the claim; every later host byte waits until a kernel_start has given
that kernel its real key (the host must consume the front end's own greeting: see
capsem_kernel.channels). Otherwise, or once a kernel was started, the stream is closed. It is
also closed if the pre-started kernel is discarded instead.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct

PROTOCOL_VERSION = 1
MAX_FRAME = 1 << 20  # 1 MiB: bounds what either side buffers for one message
HEADER = struct.Struct(">I")

PORT_CONTROL = 5000
PORT_CHANNELS = 5001
PORT_EGRESS = 5002
PORT_DNS = 5003
DOCUMENTED_PORTS = frozenset(range(5000, 5006))

KERNEL_CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
# What a primed channel stream sends the kernel ahead of the front end: the ZMTP 3.1 greeting of
# libzmq 4.x with the NULL mechanism (signature, version 3.1, "NULL", not as-server). A front end
# greets the same way; only the signature's padding differs (libzmq puts its identity's length
# there, which a ZMTP 3 peer ignores).
ZMTP_GREETING = b"\xff" + b"\x00" * 7 + b"\x01\x7f" + b"\x03\x01" + b"NULL".ljust(20, b"\x00") + b"\x00" * 32
HOST_CID = 2

MAX_STRING = 64 * 1024  # no single string field (path, argv element, ...) is longer
MAX_ARGV = 4096
MAX_ENV = 4096


class FrameError(ValueError):
    """The byte stream cannot be framed (oversized, zero length). The stream must be closed.

    `bodies` holds the complete frames that preceded the bad header in the same feed() call, so
    a receiver can still act on them (or at least answer them) before closing.
    """

    def __init__(self, message: str, bodies: list[bytes] | None = None):
        super().__init__(message)
        self.bodies = bodies or []


class MessageError(ValueError):
    """A well-framed message is invalid. The stream can go on; answer with an error."""

    def __init__(self, message: str, msg_id: int | None = None):
        super().__init__(message)
        self.msg_id = msg_id


def encode(msg: dict) -> bytes:
    """Encode one message as a frame."""
    try:  # why allow_nan=False: NaN/Infinity are not JSON and decode_body refuses them
        body = json.dumps(msg, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except ValueError as exc:
        raise FrameError(f"message cannot be encoded: {exc}") from None
    if not body or len(body) > MAX_FRAME:
        raise FrameError(f"message of {len(body)} bytes exceeds the {MAX_FRAME} byte frame limit")
    return HEADER.pack(len(body)) + body


class FrameDecoder:
    """Incremental decoder: feed() bytes, get complete frame bodies back.

    Never buffers more than one header plus MAX_FRAME bytes of a pending frame.
    """

    def __init__(self, max_frame: int = MAX_FRAME):
        self.max_frame = max_frame
        self._buf = bytearray()
        self._need: int | None = None  # body length of the frame being read
        self.broken = False

    def feed(self, data: bytes) -> list[bytes]:
        if self.broken:
            raise FrameError("decoder already failed; close the stream")
        self._buf += data
        bodies = []
        while True:
            if self._need is None:
                if len(self._buf) < HEADER.size:
                    break
                (length,) = HEADER.unpack_from(self._buf)
                if length == 0 or length > self.max_frame:
                    self.broken = True
                    raise FrameError(f"frame length {length} outside 1..{self.max_frame}", bodies)
                del self._buf[: HEADER.size]
                self._need = length
            if len(self._buf) < self._need:
                break
            bodies.append(bytes(self._buf[: self._need]))
            del self._buf[: self._need]
            self._need = None
        return bodies

    @property
    def pending(self) -> int:
        """Bytes buffered but not yet returned."""
        return len(self._buf)

    def wanted(self) -> int:
        """How many bytes complete the header or body being read. A reader that reads exactly
        this much each time never takes a byte past a frame (what follows stays in its stream)."""
        if self._need is None:
            return HEADER.size - len(self._buf)
        return self._need - len(self._buf)


# --- one frame, read exactly: bytes after it stay in the stream -------------------------------
# Used where a frame is followed by raw bytes (egress, channels) or where each read is a message
# (the proxy service's stdin). Both raise EOFError (the stream ended inside a frame; asyncio's
# IncompleteReadError is one), FrameError (a length outside 1..max_len: nothing of the body is
# read) or MessageError (a body that is not a message); nothing else of their own.

def recv_message(sock, max_len: int = MAX_FRAME) -> dict:
    """One message from a blocking socket (its timeouts and errors are OSError, as always)."""
    decoder = FrameDecoder(max_len)
    while True:
        data = sock.recv(decoder.wanted())
        if not data:
            raise EOFError("the stream ended inside a frame")
        if bodies := decoder.feed(data):
            return decode_body(bodies[0])


async def read_message(reader, max_len: int = MAX_FRAME) -> dict:
    """One message from an asyncio.StreamReader."""
    decoder = FrameDecoder(max_len)
    while True:
        if bodies := decoder.feed(await reader.readexactly(decoder.wanted())):
            return decode_body(bodies[0])


MAX_INT_DIGITS = 40  # any integer of the protocol fits (ids, pids, ports, sizes); 4300+ digits
                     # would raise ValueError inside json (CPython's int-digits limit) and cost CPU
MAX_DEPTH = 32       # no message of the protocol nests deeper; deeper input is refused, not recursed


def _strict_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError("integer too long")
    return int(text)


def _strict_float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("number out of range")
    return value


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("duplicate key")  # why: two readers could take different values
    return d


def _check_tree(value, depth: int = 0) -> None:
    """Depth bound and no lone surrogates (they cannot be encoded as UTF-8 again: every later
    write of the text to a log, a database or a socket would raise)."""
    if depth > MAX_DEPTH:
        raise ValueError("nested too deeply")
    if isinstance(value, str):
        value.encode("utf-8")
    elif isinstance(value, dict):
        for k, v in value.items():
            k.encode("utf-8")
            _check_tree(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_tree(v, depth + 1)


def strict_loads(body: bytes):
    """UTF-8 JSON from an untrusted peer. Raises only ValueError (short message): no huge
    integers, NaN/Infinity, overflowing floats, duplicate keys, lone surrogates, or nesting deeper
    than MAX_DEPTH. Also used by the pool's wire format (capsem_vm.pool.wire)."""
    try:
        value = json.loads(body.decode("utf-8"), parse_int=_strict_int, parse_float=_strict_float,
                           parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
        _check_tree(value)
    except (UnicodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(exc.__class__.__name__) from None
    return value


def decode_body(body: bytes) -> dict:
    """Parse one frame body into a message dict with a valid "t" field. Total: any bytes give a
    dict or MessageError (no huge integers, NaN/Infinity, duplicate keys, lone surrogates, or
    nesting deeper than MAX_DEPTH)."""
    try:
        msg = strict_loads(body)
    except ValueError as exc:
        raise MessageError(f"frame is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise MessageError("frame is not a JSON object")
    msg_id = msg.get("id")
    if msg_id is not None and (not isinstance(msg_id, int) or isinstance(msg_id, bool)):
        raise MessageError("'id' must be an integer")
    t = msg.get("t")
    if not isinstance(t, str) or not t:
        raise MessageError("message has no type 't'", msg_id)
    return msg


# --- field validation -------------------------------------------------------------------------

def _fail(msg: dict, text: str):
    raise MessageError(f"{msg.get('t')}: {text}", msg.get("id") if isinstance(msg.get("id"), int) else None)


def req_str(msg: dict, key: str, *, optional: bool = False, max_len: int = MAX_STRING) -> str | None:
    v = msg.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str) or len(v) > max_len or "\x00" in v:
        _fail(msg, f"field {key!r} must be a string without NUL of at most {max_len} chars")
    return v


def req_int(msg: dict, key: str, *, optional: bool = False, lo: int = -(2**63), hi: int = 2**63 - 1) -> int | None:
    v = msg.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        _fail(msg, f"field {key!r} must be an integer in [{lo}, {hi}]")
    return v


def req_bool(msg: dict, key: str, default: bool = False) -> bool:
    v = msg.get(key, default)
    if not isinstance(v, bool):
        _fail(msg, f"field {key!r} must be a boolean")
    return v


def req_str_list(msg: dict, key: str, *, max_items: int = MAX_ARGV, nonempty: bool = True) -> list[str]:
    v = msg.get(key)
    if not isinstance(v, list) or len(v) > max_items or (nonempty and not v):
        _fail(msg, f"field {key!r} must be a list of 1..{max_items} strings")
    for item in v:
        if not isinstance(item, str) or len(item) > MAX_STRING or "\x00" in item:
            _fail(msg, f"field {key!r} must contain only strings without NUL")
    return v


def req_env(msg: dict, key: str = "env") -> dict[str, str]:
    v = msg.get(key, {})
    if v is None:
        return {}
    if not isinstance(v, dict) or len(v) > MAX_ENV:
        _fail(msg, f"field {key!r} must be an object of at most {MAX_ENV} string pairs")
    for k, val in v.items():
        if (not isinstance(val, str) or not k or "=" in k or "\x00" in k or "\x00" in val
                or len(k) > MAX_STRING or len(val) > MAX_STRING):
            _fail(msg, f"field {key!r} has an invalid entry")
    return v


def req_data(msg: dict, key: str = "data", *, optional: bool = False) -> bytes | None:
    v = msg.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str):
        _fail(msg, f"field {key!r} must be base64 text")
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        _fail(msg, f"field {key!r} is not valid base64")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def error(code: str, message: str, msg_id: int | None = None) -> dict:
    msg = {"t": "error", "code": code, "message": message[:4096]}
    if msg_id is not None:
        msg["id"] = msg_id
    return msg

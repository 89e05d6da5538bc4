"""The remote tunnel's wire format (sans-IO): stream openings and control messages.

Every TLS connection between a front end and a node starts with one fixed-size frame saying what
it carries (`encode_open`): the control connection, or one of the kernel's five ZMQ channels (then
raw ZMTP bytes follow, both ways, untouched). On the control connection both sides exchange
length-prefixed JSON objects (4-byte big-endian length, then UTF-8 JSON), each at most
MAX_MESSAGE bytes, each a known "op" with its fields checked (OPS below).

Decoders are total and bounded: every malformed, oversized, truncated or unknown input raises
WireError (and nothing else); a decoder holds at most one frame, and once it raised it stays
failed (the connection is to be closed). Encoders check the same rules, so a sender cannot emit
what its peer would refuse.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
MAGIC = b"CSMR"
VERSION = 1
OPEN_SIZE = 7                     # MAGIC, version, kind, channel index
KINDS = ("control", "channel")
MAX_MESSAGE = 64 << 10            # one control message's JSON body
_LEN = struct.Struct(">I")
MAX_STR = 4096                    # ids, names, codes, reasons
MAX_DEPTH = 32                    # nesting of free-form objects (info, extra, rows)


class WireError(ValueError):
    """Malformed, oversized, truncated or unknown input on the tunnel: close the connection."""


# ---- stream openings ---------------------------------------------------------------------

@dataclass(frozen=True)
class StreamOpen:
    kind: str                     # "control" | "channel"
    channel: str | None = None    # one of CHANNELS when kind == "channel", else None

    def __post_init__(self):
        if self.kind == "control" and self.channel is None:
            return
        if self.kind == "channel" and self.channel in CHANNELS:
            return
        raise WireError(f"bad stream opening: kind={self.kind!r} channel={self.channel!r}")


def encode_open(kind: str, channel: str | None = None) -> bytes:
    StreamOpen(kind, channel)
    index = CHANNELS.index(channel) if channel is not None else 0
    return MAGIC + bytes((VERSION, KINDS.index(kind), index))


def decode_open(data: bytes) -> StreamOpen:
    """Decode exactly one opening frame (OPEN_SIZE bytes)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError("decode bytes")
    data = bytes(data)
    if len(data) != OPEN_SIZE:
        raise WireError(f"an opening is {OPEN_SIZE} bytes, got {len(data)}")
    if data[:4] != MAGIC:
        raise WireError("not a capsem tunnel stream (bad magic)")
    version, kind, index = data[4], data[5], data[6]
    if version != VERSION:
        raise WireError(f"unsupported tunnel version {version}")
    if kind == 0 and index == 0:
        return StreamOpen("control")
    if kind == 1 and index < len(CHANNELS):
        return StreamOpen("channel", CHANNELS[index])
    raise WireError(f"unknown stream kind {kind} / channel {index}")


class OpenDecoder:
    """Incremental: feed bytes until it returns the StreamOpen; bytes after it are in `rest`."""

    def __init__(self):
        self._buf = b""
        self._failed = False
        self.rest = b""
        self.done: StreamOpen | None = None

    def feed(self, data: bytes) -> StreamOpen | None:
        if self._failed:
            raise WireError("decoder already failed")
        if self.done is not None:
            raise WireError("the opening was already decoded")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise WireError("feed bytes")
        self._buf += bytes(data)
        # reject a wrong prefix at once, before the frame is complete
        if self._buf[:4] != MAGIC[:len(self._buf)]:
            self._failed = True
            raise WireError("not a capsem tunnel stream (bad magic)")
        if len(self._buf) < OPEN_SIZE:
            return None
        try:
            self.done = decode_open(self._buf[:OPEN_SIZE])
        except WireError:
            self._failed = True
            raise
        self.rest, self._buf = self._buf[OPEN_SIZE:], b""
        return self.done


# ---- control messages ----------------------------------------------------------------------

_STR, _OPT_STR, _BOOL, _INT, _DICT, _ENV, _ROWS = "str", "str|None", "bool", "int", "dict", "env", "rows"

# op -> {field: kind}; every field is required, no other field is allowed.
OPS: dict[str, dict[str, str]] = {
    # front -> node
    "start": {"kernel_id": _STR, "key": _STR, "signature_scheme": _STR, "policy": _OPT_STR,
              "folder": _OPT_STR, "cwd": _OPT_STR, "env": _ENV, "extra": _DICT},
    "interrupt": {},
    "shutdown": {"restart": _BOOL},
    # node -> front
    "ready": {"node": _STR, "info": _DICT},
    "died": {"reason": _STR},
    "error": {"code": _STR, "message": _STR},
    "audit": {"rows": _ROWS},
    # either way: liveness of the control connection (a node lost without a FIN/RST)
    "ping": {"seq": _INT},
    "pong": {"seq": _INT},
    # the Ray node actor and its front end (capsem_kernel/ray/): signals, facts, the audit barrier,
    # the Sandbox files API relayed to the guest agent
    "signal": {"signum": _INT},
    "info": {"info": _DICT},
    "stopped": {},
    "barrier": {"id": _INT},
    "barrier_done": {"id": _INT, "complete": _BOOL},
    "agent": {"id": _INT, "msg": _DICT},
    "agent_reply": {"id": _INT, "reply": _DICT},
    "agent_error": {"id": _INT, "code": _STR, "message": _STR},
}
_POLICY_FIELDS = ("policy",)      # free text, bounded only by MAX_MESSAGE


def _check_json(value) -> None:
    """Plain JSON values only (str keys, finite numbers), nested at most MAX_DEPTH."""
    stack = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if d > MAX_DEPTH:
            raise WireError("message nested too deeply")
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise WireError("object keys must be strings")
                stack.append((x, d + 1))
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
        elif isinstance(v, float):
            if v != v or v in (float("inf"), float("-inf")):
                raise WireError("non-finite number")
        elif v is not None and not isinstance(v, (str, int)):
            raise WireError(f"not a JSON value: {type(v).__name__}")


def _check_field(op: str, name: str, kind: str, value) -> None:
    def bad(what):
        raise WireError(f"{op}.{name}: {what}")
    if kind in (_STR, _OPT_STR):
        if value is None and kind == _OPT_STR:
            return
        if not isinstance(value, str):
            bad("must be a string")
        if name not in _POLICY_FIELDS and len(value) > MAX_STR:
            bad(f"longer than {MAX_STR}")
    elif kind == _BOOL:
        if not isinstance(value, bool):
            bad("must be a boolean")
    elif kind == _INT:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 63:
            bad("must be an integer in [0, 2**63)")
    elif kind == _DICT:
        if not isinstance(value, dict):
            bad("must be an object")
    elif kind == _ENV:
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in value.items()):
            bad("must be an object of strings")
    elif kind == _ROWS:
        if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
            bad("must be a list of objects")


def check_message(obj) -> dict:
    """Return obj if it is a valid control message, else raise WireError."""
    if not isinstance(obj, dict):
        raise WireError("a control message is a JSON object")
    op = obj.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise WireError(f"unknown op {str(op)[:64]!r}")
    _check_json(obj)
    fields = OPS[op]
    extra = set(obj) - set(fields) - {"op"}
    if extra:
        raise WireError(f"{op}: unknown fields {sorted(str(k)[:64] for k in extra)[:8]}")
    for name, kind in fields.items():
        if name not in obj:
            raise WireError(f"{op}: missing field {name!r}")
        _check_field(op, name, kind, obj[name])
    if op == "start":
        key = obj["key"]
        if not key or len(key) % 2 or any(c not in "0123456789abcdef" for c in key):
            raise WireError("start.key: lowercase hex")
    return obj


def encode_message(obj: dict) -> bytes:
    check_message(obj)
    try:
        body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as e:
        raise WireError(f"not encodable as JSON: {e}") from None
    if len(body) > MAX_MESSAGE:
        raise WireError(f"control message of {len(body)} bytes exceeds {MAX_MESSAGE}")
    return _LEN.pack(len(body)) + body


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise WireError(f"duplicate key {k[:64]!r}")
        out[k] = v
    return out


def _no_constants(name):
    raise WireError(f"non-finite number {name}")


def decode_body(body: bytes) -> dict:
    if len(body) > MAX_MESSAGE:
        raise WireError(f"control message of {len(body)} bytes exceeds {MAX_MESSAGE}")
    try:
        text = bytes(body).decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except WireError:
        raise
    except (ValueError, RecursionError, MemoryError, TypeError) as e:
        raise WireError(f"not JSON: {type(e).__name__}") from None
    return check_message(obj)


class MessageDecoder:
    """Incremental: feed bytes, get the complete messages in them (in order)."""

    def __init__(self):
        self._buf = bytearray()
        self._failed = False

    def feed(self, data: bytes) -> list[dict]:
        if self._failed:
            raise WireError("decoder already failed")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise WireError("feed bytes")
        self._buf += data
        out = []
        try:
            while len(self._buf) >= _LEN.size:
                (n,) = _LEN.unpack_from(self._buf)
                if n > MAX_MESSAGE:
                    raise WireError(f"control message of {n} bytes exceeds {MAX_MESSAGE}")
                if len(self._buf) < _LEN.size + n:
                    break
                body = bytes(self._buf[_LEN.size:_LEN.size + n])
                del self._buf[:_LEN.size + n]
                out.append(decode_body(body))
        except WireError:
            self._failed = True
            self._buf.clear()
            raise
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held (at most 4 + MAX_MESSAGE)."""
        return len(self._buf)

"""A size guard for the ZMTP 3.x byte stream a guest kernel sends to the host (sans-IO).

The channel forwarder (channels.py) copies raw ZMTP bytes from the guest to the front end's ZMQ
sockets on the host. libzmq allocates a whole message part as soon as its header announces the
size, and nothing in a Jupyter client limits it (ZMQ_MAXMSGSIZE is unlimited), so one guest frame
claiming 16 GB would make the Jupyter server allocate, then fill, 16 GB. The guard reads only the
framing (greeting, then flags + size of each frame) and stops the stream when:

- the greeting is not ZMTP 3.x (older framings are not needed by any current libzmq),
- a frame uses reserved flag bits,
- a frame is larger than `max_frame`, or a multi-part message larger than `max_message`.

Bodies are skipped by count, never buffered: the guard holds at most an 8-byte size field.
"""

from __future__ import annotations

MAX_FRAME = 256 << 20     # 256 MiB: a large matplotlib figure or widget buffer fits many times
MAX_MESSAGE = 512 << 20
GREETING = 64
FLAG_MORE, FLAG_LONG, FLAG_COMMAND = 0x01, 0x02, 0x04


def same_handshake(greeting: bytes, primer: bytes) -> bool:
    """Whether a front end's 64-byte ZMTP greeting asks the kernel for what `primer`, sent to the
    kernel in its place ahead of time, asked for: ZMTP 3 signature, the same version, mechanism
    and as-server flag. The signature's 8 padding bytes may differ (libzmq puts its identity's
    length there, for ZMTP 1.0 peers; a ZMTP 3 peer ignores them) and so may the filler."""
    return (len(greeting) == len(primer) == GREETING and greeting[0] == 0xFF and greeting[9] & 0x01 == 1
            and greeting[10:33] == primer[10:33])


class ZmtpViolation(ValueError):
    """The stream breaks ZMTP 3 framing or the size limits: close it."""


class ZmtpGuard:
    def __init__(self, max_frame: int = MAX_FRAME, max_message: int = MAX_MESSAGE):
        self.max_frame = max_frame
        self.max_message = max_message
        self._greeting = bytearray()
        self._header = bytearray()   # flags (+ size bytes) of the frame being read
        self._body_left = 0
        self._message = 0            # bytes of the multi-part message so far
        self._more = False
        self.broken = False
        self.messages = 0            # messages whose last frame header has been read

    def feed(self, data: bytes | memoryview) -> None:
        """Check the next bytes of the stream. Raises ZmtpViolation (and stays broken)."""
        if self.broken:
            raise ZmtpViolation("stream already rejected")
        view = memoryview(data)
        try:
            while view:
                if len(self._greeting) < GREETING:
                    take = min(GREETING - len(self._greeting), len(view))
                    self._greeting += view[:take]
                    view = view[take:]
                    self._check_greeting()
                elif self._body_left:
                    take = min(self._body_left, len(view))
                    self._body_left -= take
                    view = view[take:]
                else:
                    self._header.append(view[0])
                    view = view[1:]
                    self._frame_header()
        except ZmtpViolation:
            self.broken = True
            raise

    def _check_greeting(self) -> None:
        g = self._greeting
        if len(g) >= 1 and g[0] != 0xFF:
            raise ZmtpViolation("not a ZMTP 3 greeting (signature)")
        if len(g) >= 10 and not g[9] & 0x01:
            raise ZmtpViolation("not a ZMTP 3 greeting (signature)")
        if len(g) >= 11 and g[10] < 3:
            raise ZmtpViolation(f"ZMTP version {g[10]} is not supported (3.x only)")

    def _frame_header(self) -> None:
        flags = self._header[0]
        if flags & ~(FLAG_MORE | FLAG_LONG | FLAG_COMMAND):
            raise ZmtpViolation(f"reserved ZMTP flag bits set ({flags:#04x})")
        need = 9 if flags & FLAG_LONG else 2
        if len(self._header) < need:
            return
        size = int.from_bytes(self._header[1:need], "big")
        self._header.clear()
        if size > self.max_frame:
            raise ZmtpViolation(f"ZMTP frame of {size} bytes exceeds the {self.max_frame} byte limit")
        if flags & FLAG_COMMAND:
            if flags & FLAG_MORE:
                raise ZmtpViolation("a ZMTP command cannot have MORE set")
        else:
            self._message += size
            if self._message > self.max_message:
                raise ZmtpViolation(f"ZMTP message exceeds the {self.max_message} byte limit")
            self._more = bool(flags & FLAG_MORE)
            if not self._more:
                self._message = 0
                self.messages += 1
        self._body_left = size

"""A byte cap on what the Jupyter server keeps for a capsem kernel while no browser is connected.

jupyter_server (2.x, MappingKernelManager.start_buffering) keeps every message a kernel sends
after its last websocket closed, in a plain list, until a client reconnects with the same session:
a guest that prints without end while the tab is closed grows the server's memory without bound.
For capsem kernels the extension swaps that list for a `CappedBuffer` right after buffering
starts (same loop turn, so no message is missed): messages are kept up to `cap` bytes; past it,
replies on the shell/control/stdin channels and iopub `status` messages still fit a small reserve
(so the front end learns the cell finished), everything else is dropped and counted. On reconnect
the client first gets one stderr `stream` message (signed with the kernel's key, sent to the cell
that was printing) saying how many messages and bytes were dropped, then what was kept; the server
log says it too. The note comes first because jupyter_server's iopub rate limit (1 MB/s over 3 s by
default) applies to the replay and would swallow a note that came after 8+ MiB of output. Other
kernels are left as they are.
"""

from __future__ import annotations

import json
import logging
from typing import Any

DELIM = b"<IDS|MSG>"
PER_MESSAGE = 128   # Python objects around a message's frames, counted with its bytes
PER_FRAME = 48
HEADER_PARSE_MAX = 4096

log = logging.getLogger("capsem.server")


def message_size(parts: list) -> int:
    return PER_MESSAGE + sum(len(p) + PER_FRAME for p in parts)


def _frames(parts: list) -> list | None:
    """[signature, header, parent, metadata, content, ...] of a wire message, or None."""
    for i, p in enumerate(parts):
        if len(p) == len(DELIM) and bytes(p) == DELIM:
            rest = parts[i + 1:]
            return rest if len(rest) >= 5 else None
    return None


def _is_status(frames: list | None) -> bool:
    if frames is None or len(frames[1]) > HEADER_PARSE_MAX:
        return False
    try:
        return json.loads(bytes(frames[1])).get("msg_type") == "status"
    except (ValueError, AttributeError, RecursionError):  # 4 KiB still nest ~2000 deep
        return False


class CappedBuffer(list):
    """The `buffer` list of jupyter_server's buffer_info: append() keeps at most `cap` bytes."""

    def __init__(self, cap: int, kernel_id: str):
        super().__init__()
        self.cap, self.kernel_id = cap, kernel_id
        self.reserve = max(64 * 1024, min(1 << 20, cap // 16))
        self.size = 0
        self.dropped = self.dropped_bytes = 0
        self.drop_at: int | None = None   # how many messages were kept before the first drop
        self.parent: bytes | None = None  # parent header of the last dropped output: the note goes there

    def append(self, item: Any) -> None:
        channel, parts = item
        n = message_size(parts)
        if self.size + n <= self.cap:
            self.size += n
            return super().append(item)
        frames = _frames(parts)
        if self.size + n <= self.cap + self.reserve and (channel != "iopub" or _is_status(frames)):
            self.size += n
            return super().append(item)
        if not self.dropped:
            self.drop_at = len(self)
            log.warning("capsem: kernel %s: %d bytes buffered for a disconnected browser (the cap): dropping "
                        "further output until a client reconnects", self.kernel_id, self.size)
        self.dropped += 1
        self.dropped_bytes += n
        if channel == "iopub" and frames is not None and len(frames[2]) <= HEADER_PARSE_MAX:
            self.parent = bytes(frames[2])

    def add_note(self, session) -> None:
        """Put the signed 'output was dropped' message first (once)."""
        if not self.dropped or self.drop_at is None:
            return
        try:
            parent = json.loads(self.parent) if self.parent else {}
            parent = parent if isinstance(parent, dict) else {}
        except (ValueError, RecursionError):
            parent = {}
        text = (f"[capsem: {self.dropped} message(s), {self.dropped_bytes} bytes of output were dropped while "
                f"no browser was connected: the server keeps at most {self.cap} bytes per kernel "
                f"(c.CapsemExtension.offline_buffer_bytes); the {self.drop_at} message(s) before the first "
                "drop follow]\n")
        msg = session.msg("stream", content={"name": "stderr", "text": text}, parent=parent)
        super().insert(0, ("iopub", session.serialize(msg)))
        log.warning("capsem: kernel %s: replaying its buffer; %d message(s), %d bytes were dropped",
                    self.kernel_id, self.dropped, self.dropped_bytes)
        self.drop_at = None


def cap_offline_buffers(mkm, cap: int, is_capsem) -> None:
    """Wrap `mkm`'s start_buffering/get_buffer (jupyter_server's MappingKernelManager) so capsem
    kernels' offline buffers are CappedBuffers of `cap` bytes."""
    start, get = mkm.start_buffering, mkm.get_buffer

    def start_buffering(kernel_id, session_key, channels):
        start(kernel_id, session_key, channels)
        try:
            km = mkm.get_kernel(kernel_id)
        except KeyError:
            return
        if not is_capsem(km) or not getattr(mkm, "buffer_offline_messages", True):
            return
        info = getattr(mkm, "_kernel_buffers", {}).get(kernel_id)
        if info is None or info.get("session_key") != session_key or type(info.get("buffer")) is not list:
            # a jupyter_server whose buffering this module does not know: no unbounded buffer for a
            # capsem kernel, then (fail closed: its output while disconnected is not kept)
            log.warning("capsem: kernel %s: unknown offline buffer layout of this jupyter_server; not "
                        "buffering its messages while no browser is connected", kernel_id)
            mkm.stop_buffering(kernel_id)
            return
        info["buffer"] = CappedBuffer(cap, kernel_id)

    def get_buffer(kernel_id, session_key):
        info = get(kernel_id, session_key)
        buf = info.get("buffer") if isinstance(info, dict) else None
        if isinstance(buf, CappedBuffer) and buf.dropped:
            try:
                buf.add_note(mkm.get_kernel(kernel_id).session)
            except KeyError:
                pass
        return info

    mkm.start_buffering = start_buffering
    mkm.get_buffer = get_buffer

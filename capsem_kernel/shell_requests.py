"""Which requests a front end sends on a kernel's shell channel (sans-IO), to start a pooled
kernel's folder attach as soon as a request needs the folder.

A claimed pooled kernel answers kernel_info at once and holds every other shell request until its
notebook folder is attached (kernel_vm.py). The attach starts after the first shell reply (so it
does not compete with that reply for the emulated guest's CPUs), but a client that sends a cell
at once, without kernel_info first (jupyter_client's `execute` right after `start_channels`),
gets no reply before the attach: it waited for ClaimedVM's ATTACH_DELAY (2 s). This reads the
front end's side of the stream (ZMTP 3: a 64-byte greeting, then frames; a Jupyter message is
[identities..., "<IDS|MSG>", signature, header, parent, metadata, content, buffers...]) and says
when a message other than kernel_info_request went by.

The bytes come from the front end on the host, not from the guest, but the parser is total and
bounded all the same: frames are skipped by count, at most HEADER_LIMIT bytes of a header frame
are kept, and anything it cannot read counts as "a request that needs the folder" (starting the
attach early only costs time, never a guarantee: the folder is this kernel's either way). Once
it has seen such a request it stops looking.
"""

from __future__ import annotations

import json

GREETING = 64
DELIM = b"<IDS|MSG>"
NOT_NEEDING_THE_FOLDER = frozenset({"kernel_info_request"})  # what a held kernel answers at once
HEADER_LIMIT = 64 * 1024
MAX_PREFIX_FRAMES = 64  # identities + delimiter + signature: more than this is not a Jupyter message
FLAG_MORE, FLAG_LONG, FLAG_COMMAND = 0x01, 0x02, 0x04


class ShellRequests:
    """Feed it the front end's bytes, in any split; `needs_folder` turns True (and stays) once a
    message that is not kernel_info_request (or one it cannot read) has been seen whole up to its
    header."""

    def __init__(self) -> None:
        self.needs_folder = False
        self.kinds: list[str] = []  # msg_types seen before that (diagnostics, tests)
        self._greeting = 0
        self._head = bytearray()  # flags + size bytes of the frame being read
        self._left = 0  # body bytes of the current frame still to come
        self._keep: bytearray | None = None  # the current frame's body, when it matters
        self._command = self._more = False
        self._frames = 0  # frames of this message so far
        self._after_delim = -1  # frames since the delimiter (-1: not seen yet)
        self._skip = False  # the rest of this message does not matter (its header was read)

    def feed(self, data: bytes | memoryview) -> bool:
        """Read these bytes; returns needs_folder."""
        view = memoryview(data)
        while view and not self.needs_folder:
            if self._greeting < GREETING:
                take = min(GREETING - self._greeting, len(view))
                self._greeting += take
                view = view[take:]
            elif self._left:
                take = min(self._left, len(view))
                if self._keep is not None:
                    self._keep += view[:take]
                self._left -= take
                view = view[take:]
                if not self._left:
                    self._frame_done()
            else:
                self._head.append(view[0])
                view = view[1:]
                self._frame_header()
        return self.needs_folder

    def _frame_header(self) -> None:
        flags = self._head[0]
        if flags & ~(FLAG_MORE | FLAG_LONG | FLAG_COMMAND):
            self.needs_folder = True  # not ZMTP 3 as we know it
            return
        need = 9 if flags & FLAG_LONG else 2
        if len(self._head) < need:
            return
        size = int.from_bytes(self._head[1:need], "big")
        self._head.clear()
        self._command = bool(flags & FLAG_COMMAND)
        self._more = bool(flags & FLAG_MORE) and not self._command
        keep = not self._command and not self._skip and size <= HEADER_LIMIT
        self._keep = bytearray() if keep else None
        self._left = size
        if not size:
            self._frame_done()

    def _frame_done(self) -> None:
        body, self._keep = self._keep, None
        if self._command:  # READY, PING...: not part of a message
            return
        self._frames += 1
        if not self._skip:
            self._message_frame(bytes(body) if body is not None else None)
        if not self._more:  # the message ended
            if not self._skip:  # before its header: not a Jupyter message
                self.needs_folder = True
            self._frames, self._after_delim, self._skip = 0, -1, False

    def _message_frame(self, body: bytes | None) -> None:
        if self._after_delim < 0:
            if body == DELIM:
                self._after_delim = 0
            elif self._frames > MAX_PREFIX_FRAMES:
                self.needs_folder = True
            return
        self._after_delim += 1
        if self._after_delim < 2:  # the signature
            return
        self._skip = True  # the header: the rest of the message does not matter
        kind = None
        if body is not None:
            try:
                header = json.loads(body)
            except (ValueError, RecursionError):
                header = None
            kind = header.get("msg_type") if isinstance(header, dict) else None
        if isinstance(kind, str) and kind in NOT_NEEDING_THE_FOLDER:
            if len(self.kinds) < 16:
                self.kinds.append(kind)
        else:
            self.needs_folder = True

"""exec requests: run a process with pipes or a pty, stream its output as `out` frames.

Memory stays bounded whatever the process prints: output is read in CHUNK pieces and the next
piece is read only after the previous frame was handed to the control writer and drained, so a
slow host makes the process block on a full pipe instead of making the agent grow.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import struct
import subprocess
import termios
import time

from . import procs, protocol

CHUNK = 64 * 1024  # raw bytes per `out` frame (~87 KiB of base64, well under MAX_FRAME)
STDIN_WINDOW = 1 << 20  # stdin bytes accepted but not yet taken by the process
EXIT_DRAIN_IDLE = 2.0  # after exit, stop waiting for output that no longer moves (daemonised kids)
MAX_EXECS = 64


def _set_ctty():  # runs in the child between fork and exec: keep it trivial
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class ExecSession:
    def __init__(self, msg_id: int, send):
        self.id = msg_id
        self._send = send
        self.proc: subprocess.Popen | None = None
        self.pty = False
        self._master: int | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._stdin_eof = False
        self._last_progress = time.monotonic()
        self._sending = 0

    # --- start -------------------------------------------------------------------------------
    def spawn(self, msg: dict) -> None:
        """Validate and start the process (synchronously; fork+exec is quick). Raises on failure."""
        argv = protocol.req_str_list(msg, "argv")
        cwd = protocol.req_str(msg, "cwd", optional=True) or "/"
        env = protocol.req_env(msg, "env")
        want_stdin = protocol.req_bool(msg, "stdin")
        self.pty = protocol.req_bool(msg, "pty")
        rows = protocol.req_int(msg, "rows", optional=True, lo=1, hi=10000) or 24
        cols = protocol.req_int(msg, "cols", optional=True, lo=1, hi=10000) or 80
        uid = protocol.req_int(msg, "uid", optional=True, lo=0, hi=2**32 - 2)
        gid = protocol.req_int(msg, "gid", optional=True, lo=0, hi=2**32 - 2)
        full_env = procs.base_env(uid, "xterm-256color" if self.pty else "dumb")
        full_env.update(env)
        common = dict(cwd=cwd, env=full_env, start_new_session=True, close_fds=True,
                      **procs.credentials(uid, gid))
        if self.pty:
            master, slave = os.openpty()
            try:
                _winsize(slave, rows, cols)
                self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                             preexec_fn=_set_ctty, **common)
            except BaseException:
                os.close(master)
                raise
            finally:
                os.close(slave)
            self._master = master
        else:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE if want_stdin else subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, **common)

    async def attach(self) -> None:
        """Open the stdin side before `started` is sent, so stdin frames right after it work."""
        loop = asyncio.get_running_loop()
        if self.pty:
            self._stdin, _ = await loop.connect_write_pipe(
                asyncio.Protocol, os.fdopen(os.dup(self._master), "wb", buffering=0))
        elif self.proc.stdin is not None:
            self._stdin, _ = await loop.connect_write_pipe(asyncio.Protocol, self.proc.stdin)

    async def run(self) -> None:
        """Stream output, then report the exit. Runs as its own task."""
        proc = self.proc
        if self.pty:
            pumps = [asyncio.ensure_future(self._pump(os.fdopen(self._master, "rb", buffering=0), 1))]
        else:
            pumps = [asyncio.ensure_future(self._pump(proc.stdout, 1)),
                     asyncio.ensure_future(self._pump(proc.stderr, 2))]
        try:
            returncode = await procs.wait_exit(proc)
            await self._drain_after_exit(pumps)
        finally:
            for p in pumps:
                p.cancel()
            if self._stdin is not None and not self._stdin.is_closing():
                self._stdin.abort()
        await self._send({"t": "exit", "id": self.id, **procs.exit_fields(returncode)})

    async def _drain_after_exit(self, pumps) -> None:
        while True:
            done, pending = await asyncio.wait(pumps, timeout=0.2)
            if not pending:
                return
            if not self._sending and time.monotonic() - self._last_progress > EXIT_DRAIN_IDLE:
                return  # a background child still holds the pipe open; do not wait forever

    async def _pump(self, fileobj, fd_no: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=CHUNK, loop=loop)  # pauses reading past 2*CHUNK
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), fileobj)
        try:
            while True:
                try:
                    data = await reader.read(CHUNK)
                except OSError as exc:
                    if exc.errno == errno.EIO:  # pty: the slave side is gone
                        return
                    raise
                if not data:
                    return
                self._last_progress = time.monotonic()
                self._sending += 1
                try:
                    await self._send({"t": "out", "id": self.id, "fd": fd_no, "data": protocol.b64(data)})
                finally:
                    self._sending -= 1
                    self._last_progress = time.monotonic()
        finally:
            transport.close()

    # --- requests on a running exec ----------------------------------------------------------
    def write_stdin(self, data: bytes | None, eof: bool) -> None:
        if self._stdin is None or self._stdin.is_closing():
            raise protocol.MessageError("stdin: this exec has no open stdin", self.id)
        if data:
            if self._stdin.get_write_buffer_size() + len(data) > STDIN_WINDOW:
                raise _Overflow()
            self._stdin.write(data)
        if eof and not self.pty:  # a pty has no EOF of its own; the host sends ^D if it wants one
            self._stdin.close()  # close() flushes what is buffered first

    def resize(self, rows: int, cols: int) -> None:
        if self._master is None:
            raise protocol.MessageError("resize: not a pty exec", self.id)
        _winsize(self._master, rows, cols)

    def signal(self, signum: int) -> None:
        procs.signal_group(self.proc.pid, signum)

    def kill(self) -> None:
        try:
            self.signal(9)
        except OSError:
            pass


class _Overflow(Exception):
    pass


StdinOverflow = _Overflow

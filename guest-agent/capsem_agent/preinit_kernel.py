"""The preinit kernel process: `python3 -m capsem_agent.preinit_kernel CONNECTION_FILE ACK_FD`.

Started by ipykernel_host (kernel_prewarm {preinit}, pooled VMs). It initialises the kernel app
and starts it with the throw-away key of its connection file, warms up its message path through
its own shell port (first-time code runs slowly under emulation, a user's first cell too: one is
run, leaving no trace; skipped when the parameters are already waiting, as in a cold start), then
waits on stdin for the real key, scheme, cwd and env.
Those are applied on the kernel's loop, between messages; the process then writes "ok" to
ACK_FD, and only then does the relay let the host's channels through (Kernel.ready). If they
cannot be applied, the process exits. With hold, a second line (the release) brings the cwd.
Its fds 0/1 are saved first: ipykernel captures fd 1 (and 2) into the kernel's output stream.
"""

from __future__ import annotations

import json
import os
import select
import sys
import threading

from .held_requests import HeldRequests
from .kernel_boot import WARM_MARKER, forget_agent_modules, forget_launch_path, import_ipykernel_without_debugpy

MAX_PARAMS = 1 << 20
WARM_UP_WAIT_MS = 600000


def initialize(conn: str):
    """The kernel app, initialised (ports bound, shell built), and the variables its
    initialisation added to the environment. Its zmq sockets get no ZMTP handshake timeout: the
    agent's spare connections (ipykernel_host.SpareConnections) may wait for a pooled VM's claim
    for hours."""
    from ipykernel import kernelapp
    env0 = dict(os.environ)
    sys.argv = ["ipykernel_launcher", "-f", conn]
    app = kernelapp.IPKernelApp.instance()
    import zmq

    class PatientContext(zmq.Context):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.setsockopt(zmq.HANDSHAKE_IVL, 0)

    zmq.Context, plain_context = PatientContext, zmq.Context  # type: ignore[misc]
    try:
        app.initialize(["-f", conn])
    finally:
        zmq.Context = plain_context  # type: ignore[misc]
    added = {k: v for k, v in os.environ.items() if env0.get(k) != v}
    return app, added


# A cell like a user's first (not silent: the execute_input, pre/post_run_cell events, printed
# output and its flush, user_expressions through the display formatter) runs ~3x slower the first
# time under emulation (measured 0.08-0.10 s against 0.025-0.035 s for the next). Run one before
# the claim, leaving no trace for the user: store_history False keeps the execution count, In,
# _i* and the history database as they were; the code binds no name and has no value (no `_`).
# Its output and execute_input go to an iopub nobody subscribed to yet.
FIRST_CELL_WARM_UP = {"code": "print(' ', end='')", "silent": False, "store_history": False,
                      "user_expressions": {"cwd": "__import__('os').getcwd()",
                                           "files": "sorted(__import__('os').listdir())"},
                      "allow_stdin": False}


def warm_up(app) -> None:
    """A kernel_info, a silent `pass` and a first cell (FIRST_CELL_WARM_UP) through the kernel's
    own shell port (throw-away key)."""
    import zmq
    from jupyter_client.session import Session
    session = Session(key=app.session.key, signature_scheme=app.session.signature_scheme)
    ctx = zmq.Context()
    shell = ctx.socket(zmq.DEALER)
    shell.linger = 0
    shell.connect("tcp://127.0.0.1:%d" % app.shell_port)
    try:
        for msg_type, content in (("kernel_info_request", {}),
                                  ("execute_request", {"code": "pass", "silent": True, "store_history": False,
                                                       "user_expressions": {}, "allow_stdin": False}),
                                  ("execute_request", FIRST_CELL_WARM_UP)):
            session.send(shell, msg_type, content)
            if not shell.poll(WARM_UP_WAIT_MS):
                return
            session.recv(shell)
    finally:
        shell.close()
        ctx.term()


class Handover:
    """The kernel_start side of a preinit kernel: a thread reads the parameters, the kernel's loop
    applies them. Anything half applied is no kernel to hand out: the process exits and the host
    sees kernel_exit with the reason."""

    def __init__(self, app, loop, added: dict[str, str], out_fd: int, in_fd: int, ack_fd: int):
        self.app, self.loop, self.added = app, loop, added
        self.out_fd, self.in_fd, self.ack_fd = out_fd, in_fd, ack_fd
        self.held = HeldRequests()

    def fail(self, text: str) -> None:
        os.write(self.out_fd, f"capsem: {text}\n".encode())  # out_fd: the kernel's own stdout
        os._exit(1)

    def take_over(self, params: dict) -> None:
        """On the kernel's loop: the real key, scheme, env and (unless held) cwd; then ack."""
        try:
            fd = os.open(os.devnull, os.O_RDONLY)
            os.dup2(fd, 0)
            os.close(fd)
            if params.get("hold"):
                self.held.hold(self.app.kernel.shell_handlers)
            else:
                os.chdir(params["cwd"])
            os.environ.clear()
            os.environ.update(params["env"])
            os.environ.update(self.added)
            self.app.session.signature_scheme = params["signature_scheme"]
            self.app.session.key = params["key"].encode()
        except BaseException as exc:
            self.fail("the kernel could not take its parameters: %r" % (exc,))
        os.write(self.ack_fd, b"ok\n")
        os.close(self.ack_fd)

    def release(self, cwd: str) -> None:
        """On the kernel's loop: the held kernel's folder is attached; run its requests there."""
        try:
            os.chdir(cwd)
        except BaseException as exc:
            self.fail("the kernel could not change to %r: %r" % (cwd, exc))
        self.held.release()

    def run(self) -> None:
        """The handover thread: warm up unless the parameters already wait, write the marker,
        then pass the parameters (and a held kernel's release) to the loop."""
        if not select.select([self.in_fd], [], [], 0)[0]:
            try:
                warm_up(self.app)
            except Exception:
                pass
        os.write(self.out_fd, WARM_MARKER)  # out_fd stays open: take_over's errors go there
        lines = os.fdopen(self.in_fd, "rb")
        line = lines.readline(MAX_PARAMS)
        if not line:
            os._exit(0)
        params = json.loads(line)
        self.loop.add_callback(self.take_over, params)
        if params.get("hold"):
            line = lines.readline(MAX_PARAMS)
            if not line:  # closed without a release: the folder never came
                self.fail("the kernel was not released (the notebook folder was not attached)")
            self.loop.add_callback(self.release, json.loads(line)["cwd"])


def main() -> None:
    forget_launch_path()
    out_fd, in_fd, ack_fd = os.dup(1), os.dup(0), int(sys.argv[2])
    conn = sys.argv[1]
    import_ipykernel_without_debugpy()
    from tornado import ioloop
    app, added = initialize(conn)
    handover = Handover(app, ioloop.IOLoop.current(), added, out_fd, in_fd, ack_fd)
    forget_agent_modules()
    threading.Thread(target=handover.run, daemon=True).start()
    app.start()


if __name__ == "__main__":
    main()

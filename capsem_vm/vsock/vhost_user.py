"""vsock through vhost-device-vsock: QEMU <-vhost-user-> backend <-Unix sockets-> host.

Host -> guest: connect to the backend's --uds-path, write "CONNECT <port>\\n", read "OK <n>\\n".
Guest -> host: the backend connects to the Unix socket "<uds-path>_<port>", which we listen on.
Only the ports we listen on exist: a guest connecting to any other host port is refused by the
backend (no such socket).

The backend runs under a seccomp deny filter (seccomp.VSOCK_RULES: no exec after its launch, no
ptrace, mounts, namespaces, module/kexec/bpf/keyring calls, set-id calls...), installed right
before its exec: by spawn() for a root capsem, by `python -I seccomp.py` inside confine.py's
wrapper for a normal user; exec_gate.py lets its launch exec through once.
"""

from __future__ import annotations

import asyncio
import sys

from .. import confine, helpers, seccomp
from ..caplog import CappedLog
from ..config import RuntimePaths
from ..errors import VMError
from ..exec_gate import ExecGate
from ..polling import poll_until_async
from ..process import ManagedProcess, spawn
from .base import CONNECT_TIMEOUT, StreamHandler, VsockTransport

GUEST_CID = 3  # each VM has its own backend, so every guest can use the same CID
MAX_HANDSHAKE_LINE = 64


class VhostUserTransport(VsockTransport):
    name = "vhost-user"

    def __init__(self, paths: RuntimePaths) -> None:
        super().__init__(paths)
        self.process: ManagedProcess | None = None

    def qemu_args(self) -> list[str]:
        # relative: QEMU runs in the VM dir (see qemu.py)
        return ["-chardev", f"socket,id=vsock,path={self.paths.vsock_backend.name}",
                "-device", "vhost-user-vsock-pci,chardev=vsock"]

    async def start(self) -> None:
        program = helpers.vhost_device_vsock()
        log = CappedLog(self.paths.root / "vsock.log")
        gate = ExecGate("vhost-device-vsock")
        try:
            gate.start()
            if self.identity is None:  # a normal user's capsem: namespaces instead of a uid
                # the filter goes in last, inside the wrapper (it refuses what unshare/setpriv do)
                argv = confine.wrap(gate.wrap([str(program.path), "--guest-cid", str(GUEST_CID),  # (paths name its VM)
                                               "--socket", str(self.paths.vsock_backend), "--uds-path",
                                               str(self.paths.vsock_uds)]), self.paths.root,
                                    needed=[seccomp.__file__, sys.executable])
                executable, seccomp_filter, pass_fds = None, None, gate.pass_fds
            else:
                argv = [f"vhost-device-vsock[{self.paths.root}]",  # argv[0]: names its VM (ps, tests)
                        "--guest-cid", str(GUEST_CID),
                        # relative to its cwd, the VM dir: its uid cannot walk the dirs above
                        "--socket", self.paths.vsock_backend.name, "--uds-path", self.paths.vsock_uds.name]
                executable, seccomp_filter, pass_fds = str(program.path), gate.filter, ()
            self.process = await spawn("vhost-device-vsock", argv, executable=executable, stdout=log.fd,
                                       stderr=log.fd, identity=self.identity, cwd=self.paths.root,
                                       seccomp=seccomp_filter, pass_fds=pass_fds)
            if self.identity is None:
                self.process.stop_signal = confine.STOP_SIGNAL
        finally:
            gate.close_ours()
            log.close_writer()
        # QEMU connects as a client: the backend's socket must exist first.
        process = self.process
        await poll_until_async(lambda: self._backend_listening(process), timeout=10, interval=0.005,
                               what="vhost-device-vsock to create its socket", error=VMError)
        try:
            await gate.done()  # it runs: its launch went through the gate, no exec after this one
        except OSError as exc:
            raise VMError(f"vhost-device-vsock: {exc.strerror}") from exc

    def _backend_listening(self, process: ManagedProcess) -> bool:
        if self.paths.vsock_backend.exists():
            return True
        if not process.alive():
            raise VMError(f"vhost-device-vsock exited with code {process.returncode}: "
                          + _tail(self.paths.root / "vsock.log"))
        return False

    def helper_processes(self) -> list[ManagedProcess]:
        return [self.process] if self.process else []

    async def listen(self, port: int, handler: StreamHandler) -> None:
        path = f"{self.paths.vsock_uds}_{port}"
        server = await asyncio.start_unix_server(handler, path=path)
        self._own_socket(path)
        self._servers.append(server)

    async def connect(self, port: int, timeout: float = CONNECT_TIMEOUT):
        async def handshake():
            reader, writer = await asyncio.open_unix_connection(str(self.paths.vsock_uds))
            writer.write(f"CONNECT {port}\n".encode())
            line = await reader.readline()
            if not line.startswith(b"OK ") or len(line) > MAX_HANDSHAKE_LINE:
                writer.close()
                raise ConnectionRefusedError(f"guest port {port} refused the connection")
            return reader, writer

        return await asyncio.wait_for(handshake(), timeout)

    async def close(self) -> None:
        await super().close()
        if self.process:
            await self.process.stop(grace=2)


def _tail(path, limit=2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""

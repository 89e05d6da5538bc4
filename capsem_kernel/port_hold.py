"""Hold a kernel's five channel ports from the moment they are chosen until its channel forwarder
serves them (channels.py).

jupyter_client picks free ports (bind to port 0, close) and writes them to the connection file; a
local kernel binds them within a second. A capsem kernel's forwarder binds them only once its VM
has booted: tens of seconds cold, minutes with many kernels booting on a small host. Meanwhile
any other process on the host (another Jupyter server, another kernel manager) whose own bind to
port 0 draws the same port takes it, and the kernel fails to start with "address in use" after
its whole boot. Seen at 20 kernels started at once (bench/many.py) on a host shared with other
Jupyter processes. So the provisioner listens on the ports at once and the forwarder adopts those
sockets. Listening, not only bound: a bound socket with SO_REUSEADDR does not keep another
SO_REUSEADDR socket (libzmq's, asyncio's) from binding the same port; a listening one does.
"""

from __future__ import annotations

import socket


def hold(ip: str, ports: dict[str, int]) -> dict[str, socket.socket]:
    """A listening socket on ip:port for each name; all or none (OSError if one is taken)."""
    held: dict[str, socket.socket] = {}
    try:
        for name, port in ports.items():
            family = socket.AF_INET6 if ":" in ip else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            held[name] = sock
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((ip, port))
            sock.listen(128)
    except BaseException:
        release(held)
        raise
    return held


def usable(held: dict[str, socket.socket] | None) -> bool:
    """Every socket still open (a forwarder that served them closed them when it stopped)."""
    return bool(held) and all(s.fileno() >= 0 for s in held.values())


def release(held: dict[str, socket.socket] | None) -> None:
    for sock in (held or {}).values():
        sock.close()

"""A capsem kernel's channel ports are its own from pre_launch on (capsem_kernel/port_hold.py): a
cold VM boots for tens of seconds before its forwarder serves them, and another process's bind
(libzmq's and asyncio's use SO_REUSEADDR) must not take one meanwhile. Released by cleanup."""

import errno
import socket

import pytest

from capsem_kernel import port_hold
from test_kernel_unit import install, provisioner

KEYS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


def bind_like_zmq(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        s.listen(1)
    except BaseException:
        s.close()
        raise
    return s


async def test_the_ports_are_held_from_pre_launch_until_cleanup(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSEM_RUNTIME_DIR", str(tmp_path / "rt"))
    (tmp_path / "rt").mkdir(mode=0o700)
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jrt"))
    install(tmp_path)
    p = provisioner(tmp_path, "capsem")
    await p.pre_launch(cwd=str(tmp_path))
    ports = [int(p.connection_info[k]) for k in KEYS]
    assert len(set(ports)) == 5
    for port in ports:  # what another kernel manager's kernel (or any server) would do meanwhile
        with pytest.raises(OSError) as exc:
            bind_like_zmq(port).close()
        assert exc.value.errno == errno.EADDRINUSE
    await p.cleanup(restart=False)
    for port in ports:
        bind_like_zmq(port).close()


def test_hold_is_all_or_nothing():
    taken = bind_like_zmq(0)
    free = bind_like_zmq(0)
    free_port = free.getsockname()[1]
    free.close()
    try:
        with pytest.raises(OSError):
            port_hold.hold("127.0.0.1", {"shell": free_port, "iopub": taken.getsockname()[1]})
        bind_like_zmq(free_port).close()  # the one it got was let go again
    finally:
        taken.close()
    held = port_hold.hold("127.0.0.1", {"shell": free_port})
    assert port_hold.usable(held)
    port_hold.release(held)
    assert not port_hold.usable(held) and not port_hold.usable(None)

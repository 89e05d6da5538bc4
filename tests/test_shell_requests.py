"""capsem_kernel/shell_requests.py: which requests a front end sends on the shell channel, read
from the real ZMTP bytes a jupyter_client DEALER socket sends (captured on a plain TCP listener),
in any split; arbitrary bytes never raise and at worst count as a request needing the folder."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import zmq
from hypothesis import given, settings, strategies as st
from jupyter_client.session import Session

from capsem_kernel.shell_requests import HEADER_LIMIT, ShellRequests


def captured(messages: list[tuple[str, dict]], key: bytes = b"k" * 32) -> bytes:
    """What a jupyter_client shell socket sends for these messages: greeting, READY, frames."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    got = bytearray()

    def serve():
        conn, _ = srv.accept()
        conn.settimeout(2)
        # answer as a ZMTP 3.0 NULL peer (ROUTER), so the DEALER sends its messages
        conn.sendall(b"\xff" + b"\0" * 8 + b"\x7f\x03\x00NULL" + b"\0" * 16 + b"\x01" + b"\0" * 31)
        conn.sendall(b"\x04\x1c\x05READY\x0bSocket-Type\x00\x00\x00\x06ROUTER")
        try:
            while chunk := conn.recv(65536):
                got.extend(chunk)
        except socket.timeout:
            pass
        conn.close()
    th = threading.Thread(target=serve)
    th.start()
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger = 1000
    s.connect(f"tcp://127.0.0.1:{port}")
    session = Session(key=key)
    for msg_type, content in messages:
        session.send(s, msg_type, content)
    time.sleep(0.5)
    s.close()
    ctx.term()
    th.join()
    srv.close()
    return bytes(got)


KERNEL_INFO = ("kernel_info_request", {})
EXECUTE = ("execute_request", {"code": "import os", "silent": False, "store_history": True,
                               "user_expressions": {"cwd": "os.getcwd()"}, "allow_stdin": False})


@pytest.fixture(scope="module")
def streams():
    return {"info_only": captured([KERNEL_INFO, KERNEL_INFO]),
            "info_then_execute": captured([KERNEL_INFO, EXECUTE]),
            "execute_first": captured([EXECUTE]),
            "comm_info": captured([("comm_info_request", {})]),
            "big_execute": captured([("execute_request", {**EXECUTE[1], "code": "x = 1\n" * 40000})])}


def feed_split(data: bytes, cuts: list[int]) -> ShellRequests:
    w = ShellRequests()
    prev = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts) + [len(data)]:
        w.feed(data[prev:cut])
        prev = cut
    return w


def test_kernel_info_alone_does_not_need_the_folder(streams):
    w = ShellRequests()
    assert w.feed(streams["info_only"]) is False
    assert w.kinds == ["kernel_info_request", "kernel_info_request"]


@pytest.mark.parametrize("name", ["info_then_execute", "execute_first", "comm_info", "big_execute"])
def test_any_other_request_needs_the_folder(streams, name):
    assert ShellRequests().feed(streams[name]) is True


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=12))
def test_any_split_gives_the_same_answer(streams, cuts):
    for name, data in streams.items():
        assert feed_split(data, cuts).needs_folder is (name != "info_only"), name


def test_the_answer_comes_once_the_execute_header_is_whole(streams):
    data = streams["info_then_execute"]
    inside_header = data.index(b'"execute_request"')  # the header frame is not whole before this
    w = ShellRequests()
    assert w.feed(data[:inside_header]) is False and w.kinds == ["kernel_info_request"]
    assert w.feed(data[inside_header:]) is True


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes_never_raise(data):
    w = ShellRequests()
    w.feed(data)
    assert isinstance(w.needs_folder, bool) and len(w.kinds) <= 16


def test_unreadable_headers_count_as_needing_the_folder():
    greeting = b"\xff" + b"\0" * 63
    def frame(body: bytes, more: bool) -> bytes:
        flags = 0x01 if more else 0
        if len(body) > 255:
            return bytes([flags | 0x02]) + len(body).to_bytes(8, "big") + body
        return bytes([flags, len(body)]) + body
    def message(header: bytes) -> bytes:
        return frame(b"<IDS|MSG>", True) + frame(b"sig", True) + frame(header, True) + frame(b"{}", False)
    for header in (b"not json", b"[1]", b'{"msg_type": 3}', b"\xff\xfe", b"{" * 100000,
                   b'{"msg_type": "kernel_info_request", "x": "' + b"a" * HEADER_LIMIT + b'"}'):
        assert ShellRequests().feed(greeting + message(header)) is True, header[:40]
    assert ShellRequests().feed(greeting + message(b'{"msg_type": "kernel_info_request"}')) is False
    # a message with no delimiter in its first frames is not a Jupyter request we know
    assert ShellRequests().feed(greeting + frame(b"x", False)) is True
    assert ShellRequests().feed(greeting + b"\x80\x01x") is True  # reserved flag bits

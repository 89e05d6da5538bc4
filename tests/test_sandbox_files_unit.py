"""Sandbox.files on the host (capsem_kernel/files.py), no VM: the pure path and name checks
(hypothesis), and the whole client against a LYING guest agent: the real ControlConnection and
Files talk to a peer that answers file requests with hostile replies. Whatever the guest says,
the host ends with a clear error (or bounded data), never hangs, never writes outside local_dir.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capsem_agent import protocol
from capsem_kernel import files, loop_thread
from capsem_vm.control import ControlConnection

FOLDER = "/srv/work/nb"


# --- pure checks --------------------------------------------------------------------------------

@pytest.mark.parametrize("path,want", [("a/b.txt", "a/b.txt"), ("./a//b/", "a/b"), ("", ""), (".", ""),
                                       (FOLDER, ""), (FOLDER + "/x/y", "x/y"), (FOLDER + "//x/./y", "x/y")])
def test_folder_relative_accepts_paths_in_the_folder(path, want):
    assert files.folder_relative(path, FOLDER) == want


@pytest.mark.parametrize("path", ["..", "../x", "a/../../x", "a/..", FOLDER + "/../nb2/x", "/srv/work/nbX/y",
                                  "/srv/work", "/etc/passwd", "/", "a\x00b", FOLDER + "/a/../b", "x/" + "y" * 256])
def test_folder_relative_refuses_everything_else(path):
    with pytest.raises(files.PathRefused):
        files.folder_relative(path, FOLDER)


_part = st.sampled_from(["..", ".", "", "a", "nb", "srv", "work", "b c", "\x00", "é"]) | st.text(max_size=8)


@settings(max_examples=500)
@given(parts=st.lists(_part, max_size=8), absolute=st.booleans())
def test_folder_relative_never_leaves_the_folder(parts, absolute):
    path = ("/" if absolute else "") + "/".join(parts)
    try:
        rel = files.folder_relative(path, FOLDER)
    except files.PathRefused:
        return
    comps = rel.split("/") if rel else []
    assert all(c not in ("", ".", "..") and "\x00" not in c for c in comps)
    assert os.path.normpath(os.path.join(FOLDER, rel)).startswith(FOLDER)
    assert ".." not in parts or False  # any '..' anywhere is refused


@settings(max_examples=500)
@given(name=st.text(max_size=300))
def test_safe_name_is_one_plain_component(name):
    if files.safe_name(name):
        assert os.path.basename(name) == name and name not in (".", "..") and "\x00" not in name
        assert os.path.normpath(os.path.join("/base", name)) == "/base/" + name


# --- a lying agent --------------------------------------------------------------------------------

class LyingAgent:
    """The guest end of a control connection: answers each `file` request with respond(msg)
    (a dict, or raw bytes sent as they are, or None for silence)."""

    def __init__(self, respond):
        self.respond = respond
        self.requests: list[dict] = []
        host_sock, self.sock = socket.socketpair()

        async def connect():
            reader, writer = await asyncio.open_connection(sock=host_sock)
            conn = ControlConnection(reader, writer)
            conn.adopt({"v": 1})
            return conn
        self.conn = loop_thread.run_sync(connect(), 10)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        decoder = protocol.FrameDecoder()
        while data := _recv_or_eof(self.sock):
            for body in decoder.feed(data):
                msg = protocol.decode_body(body)
                self.requests.append(msg)
                out = self.respond(msg)
                try:
                    if isinstance(out, dict):
                        self.sock.sendall(protocol.encode({"id": msg["id"], **out}))
                    elif isinstance(out, bytes):
                        self.sock.sendall(out)
                except OSError:  # the host end hung up (on purpose: it refused a reply)
                    return

    def close(self):
        loop_thread.run_sync(self.conn.close(), 10)
        # wake the serving thread (EOF) and let it end before the fd is closed: closing it under a
        # blocked recv() could hand the number to another test's socket meanwhile
        self.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(10)
        self.sock.close()


def _recv_or_eof(sock: socket.socket) -> bytes:
    try:
        return sock.recv(1 << 20)
    except OSError:  # reset by the host end (a test that closed the connection on purpose)
        return b""


def sandbox_for(agent: LyingAgent, folder=FOLDER):
    return SimpleNamespace(folder=Path(folder), _control=lambda: agent.conn)


@pytest.fixture
def lying():
    agents = []

    def make(respond, folder=FOLDER):
        a = LyingAgent(respond)
        agents.append(a)
        return files.Files(sandbox_for(a, folder)), a
    yield make
    for a in agents:
        a.close()


def ok(**fields):
    return {"t": "ok", **fields}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BAD_READS = [
    ok(data=b64(b"x" * 11), size=11, eof=True),          # more than asked (asked 10 + 1)
    ok(data="!!notbase64", size=1, eof=True),
    ok(data=b64(b"x"), size=-1, eof=True),
    ok(data=b64(b"x"), size=1, eof="yes"),
    ok(data=b64(b"x"), size=True, eof=True),
    ok(data=b64(b"x"), size=1),
    ok(data=5, size=1, eof=True),
    ok(size=1, eof=True),
    {"t": "pong"},                                         # a reply of the wrong kind
]


@pytest.mark.parametrize("reply", BAD_READS)
def test_a_lying_read_reply_is_an_error_not_data(lying, reply):
    f, _ = lying(lambda m: reply)
    with pytest.raises(files.FilesError) as e:
        f.read("x", max_bytes=10)
    assert e.value.code in ("bad_reply", "too_large")


def test_a_read_that_never_ends_stops_at_max_bytes(lying):
    f, agent = lying(lambda m: ok(data=b64(b"y" * m["length"]), size=1, eof=False))
    with pytest.raises(files.FilesError) as e:
        f.read("x", format="bytes", max_bytes=2 * files.CHUNK + 5)
    assert e.value.code == "too_large" and len(agent.requests) == 3


def test_empty_data_without_eof_ends_the_read(lying):
    f, agent = lying(lambda m: ok(data="", size=100, eof=False))
    assert f.read("x", format="bytes") == b"" and len(agent.requests) == 1


def test_the_agents_error_text_is_escaped_and_bounded(lying):
    f, _ = lying(lambda m: {"t": "error", "code": "not_found\x1b[2J", "message": "\x1b]0;pwn\x07" + "m" * 5000})
    with pytest.raises(files.FilesError) as e:
        f.read("x")
    assert "\x1b" not in str(e.value) and "\x1b" not in e.value.code and len(str(e.value)) < 1000


def test_error_codes_map_to_exceptions(lying):
    f, _ = lying(lambda m: {"t": "error", "code": "not_found", "message": "gone"})
    with pytest.raises(FileNotFoundError):
        f.read("x")
    assert f.exists("x") is False
    f, _ = lying(lambda m: {"t": "error", "code": "path_refused", "message": "a link"})
    with pytest.raises(files.PathRefused):
        f.read("x")


def entry(name, type="file", size=1):
    return {"name": name, "type": type, "size": size, "mode": 0o644, "mtime": 0}


BAD_LISTS = [
    ok(entries=[entry("..")], more=False, skipped=0),
    ok(entries=[entry(".")], more=False, skipped=0),
    ok(entries=[entry("")], more=False, skipped=0),
    ok(entries=[entry("a/b")], more=False, skipped=0),
    ok(entries=[entry("/etc")], more=False, skipped=0),
    ok(entries=[entry("a\x00b")], more=False, skipped=0),
    ok(entries=[entry("n" * 256)], more=False, skipped=0),
    ok(entries=[entry("b"), entry("a")], more=False, skipped=0),      # unsorted
    ok(entries=[entry("a"), entry("a")], more=False, skipped=0),      # repeated
    ok(entries=[], more=True, skipped=0),                              # paging that never moves
    ok(entries=[entry("a", type="device")], more=False, skipped=0),
    ok(entries=[entry("a", size=-5)], more=False, skipped=0),
    ok(entries=[{"name": "a"}], more=False, skipped=0),
    ok(entries="a,b", more=False, skipped=0),
    ok(entries=[entry("a")], more="no", skipped=0),
]


@pytest.mark.parametrize("reply", BAD_LISTS)
def test_a_lying_list_reply_is_an_error(lying, reply, tmp_path):
    f, _ = lying(lambda m: reply)
    with pytest.raises(files.AgentReplyError):
        f.list("")
    with pytest.raises(files.AgentReplyError):
        f.download_dir("", tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_page_that_goes_back_is_refused(lying):
    def respond(m):
        return ok(entries=[entry("a")], more=True, skipped=0)  # the same page again after "a"
    f, agent = lying(respond)
    with pytest.raises(files.AgentReplyError):
        f.list("")
    assert len(agent.requests) == 2


def test_an_endless_tree_stops_at_the_depth_bound(lying, tmp_path):
    f, agent = lying(lambda m: ok(entries=[entry("d", type="dir")], more=False, skipped=0)
                     if m["op"] == "list" else ok())
    with pytest.raises(files.FilesError) as e:
        f.download_dir("", tmp_path / "out")
    assert e.value.code == "too_large" and len(agent.requests) <= files.MAX_DEPTH + 2


def test_an_endless_listing_stops_at_the_entry_bound(lying):
    f, agent = lying(lambda m: ok(entries=[entry(m["after"] + "z")], more=True, skipped=0))
    with pytest.raises(files.FilesError) as e:
        f.list("", max_entries=50)
    assert e.value.code == "too_large" and len(agent.requests) <= 52


def test_download_dir_writes_only_beneath_local_dir_and_never_through_links(lying, tmp_path):
    """Links the user (or an earlier download) left in local_dir are replaced, never written
    through; a guest 'symlink' entry is never created; a directory link is not entered."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("KEEP")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(outside / "keep", out / "f")
    os.symlink(outside, out / "d")

    def respond(m):
        if m["op"] == "list":
            if m["path"] == "":
                return ok(entries=[entry("d", "dir"), entry("f"), entry("l", "symlink"), entry("s", "other")],
                          more=False, skipped=0)
            return ok(entries=[entry("keep")], more=False, skipped=0)
        if m["op"] == "read":
            return ok(data=b64(b"GUEST"), size=5, eof=True)
        return ok()
    f, _ = lying(respond)
    with pytest.raises(OSError):  # out/d is a link on the host: not entered
        f.download_dir("", out)
    assert (outside / "keep").read_text() == "KEEP" and sorted(os.listdir(outside)) == ["keep"]
    os.unlink(out / "d")
    result = f.download_dir("", out)
    assert (out / "f").read_bytes() == b"GUEST" and not (out / "f").is_symlink()
    assert (out / "d" / "keep").read_bytes() == b"GUEST"
    assert not os.path.lexists(out / "l") and not os.path.lexists(out / "s")
    assert len(result.skipped) == 2 and result.files == 2
    assert (outside / "keep").read_text() == "KEEP"


def test_paths_are_checked_before_anything_is_sent(lying):
    f, agent = lying(lambda m: ok())
    for bad in ("../x", "/etc/passwd", FOLDER + "/../y", "a\x00"):
        for call in (lambda: f.read(bad), lambda: f.write(bad, "x"), lambda: f.list(bad),
                     lambda: f.remove(bad), lambda: f.exists(bad)):
            with pytest.raises(files.PathRefused):
                call()
    assert agent.requests == []


def test_writes_are_chunked_and_capped(lying):
    f, agent = lying(lambda m: ok(size=0))
    data = os.urandom(2 * files.CHUNK + 3)
    f.write("big.bin", data)
    got = b"".join(base64.b64decode(m["data"]) for m in agent.requests)
    assert got == data and [m["offset"] for m in agent.requests] == [0, files.CHUNK, 2 * files.CHUNK]
    assert [m["truncate"] for m in agent.requests] == [True, False, False]
    with pytest.raises(files.FilesError):
        f.write("big.bin", data, max_bytes=10)
    assert len(agent.requests) == 3


def test_a_dying_connection_is_a_sandbox_error_not_a_hang(lying):
    f, agent = lying(lambda m: None)
    threading.Timer(0.5, agent.sock.shutdown, (socket.SHUT_RDWR,)).start()
    from capsem_kernel.sandbox import SandboxError
    with pytest.raises(SandboxError):
        f.read("x")


@pytest.mark.parametrize("raw", [b"\xff\xff\xff\xff", b"\x00\x00\x00\x04[1,2", b"\x00\x00\x00\x03abc",
                                 protocol.HEADER.pack(12) + b'{"t":"ok","id":1e999}'[:12]])
def test_broken_frames_end_in_an_error_not_a_hang(lying, raw):
    f, _ = lying(lambda m: raw)
    from capsem_kernel.sandbox import SandboxError
    with pytest.raises((SandboxError, files.FilesError)):
        f.read("x")

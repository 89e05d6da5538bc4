"""The guest agent's `file` request (capsem_agent/files_op.py) run by the REAL agent on the host
(tests/agent_harness.py): beneath its root only, no link ever followed, bounded, never blocking.

The class: every way a path could leave the root or go through a link: '..', '.', empty
components, absolute paths, a link as the final component, as an intermediate directory, as the
root's own component, links to files and to directories, inside and outside the root, for every
operation (read, write, list, stat, mkdir, remove); and special files (a FIFO never blocks).
"""

from __future__ import annotations

import base64
import os
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capsem_agent import files_op

_ids = iter(range(10_000, 10**9))


def req(agent, root, op, path, **kw) -> dict:
    return agent.client.request({"t": "file", "id": next(_ids), "op": op, "root": str(root), "path": path, **kw})


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def world(agent, tmp_path):
    root = tmp_path / "share"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("SECRET")
    (root / "sub").mkdir()
    (root / "sub" / "a.txt").write_text("hello")
    os.symlink(outside / "secret", root / "link_file")         # absolute, out of the root
    os.symlink(outside, root / "link_dir")
    os.symlink("sub/a.txt", root / "link_inside")               # relative, within the root
    os.symlink("sub", root / "link_subdir")
    os.symlink("../outside", root / "sub" / "dotdot_link")
    return agent, root, outside


def test_read_write_list_stat_mkdir_remove(world):
    agent, root, _ = world
    r = req(agent, root, "read", "sub/a.txt", length=100)
    assert r["t"] == "ok" and base64.b64decode(r["data"]) == b"hello" and r["eof"] and r["size"] == 5
    r = req(agent, root, "write", "new/deep/b.bin", data=b64(b"\x00\xff"), truncate=True, parents=True)
    assert r["t"] == "ok" and (root / "new/deep/b.bin").read_bytes() == b"\x00\xff"
    r = req(agent, root, "write", "new/deep/b.bin", data=b64(b"Z"), offset=2)
    assert (root / "new/deep/b.bin").read_bytes() == b"\x00\xffZ"
    r = req(agent, root, "list", "")
    kinds = {e["name"]: e["type"] for e in r["entries"]}
    assert kinds == {"sub": "dir", "new": "dir", "link_file": "symlink", "link_dir": "symlink",
                     "link_inside": "symlink", "link_subdir": "symlink"}
    assert [e["name"] for e in r["entries"]] == sorted(kinds) and r["more"] is False
    assert req(agent, root, "stat", "sub/a.txt")["size"] == 5
    assert req(agent, root, "stat", "nope")["code"] == "not_found"
    assert req(agent, root, "mkdir", "m/n", parents=True)["created"] is True
    assert req(agent, root, "mkdir", "m/n", parents=True)["created"] is False
    assert req(agent, root, "remove", "new")["t"] == "ok" and not (root / "new").exists()


LINK_PATHS = ["link_file", "link_dir/secret", "link_inside", "link_subdir/a.txt", "sub/dotdot_link/secret",
              "link_dir", "link_subdir"]


@pytest.mark.parametrize("op", ["read", "write", "list", "stat", "mkdir", "remove"])
@pytest.mark.parametrize("path", LINK_PATHS)
def test_no_link_is_ever_followed(world, op, path):
    agent, root, outside = world
    kw = {"read": {"length": 10}, "write": {"data": b64(b"PWNED"), "truncate": True, "parents": True},
          "mkdir": {"parents": True}}.get(op, {})
    r = req(agent, root, op, path, **kw)
    final_link = "/" not in path
    if op == "stat" and final_link:  # stat of the link itself, without following it
        assert r["type"] == "symlink"
    elif op == "remove" and final_link:  # removes the link, never its target
        assert r["t"] == "ok" and not os.path.lexists(root / path)
    elif op == "mkdir" and final_link:
        assert r["t"] == "error" and r["code"] == "not_a_dir", r
    else:
        assert r["t"] == "error" and r["code"] == "path_refused" and "symbolic link" in r["message"], r
    assert (outside / "secret").read_text() == "SECRET"
    assert sorted(os.listdir(outside)) == ["secret"]
    assert (root / "sub" / "a.txt").read_text() == "hello"


def test_link_in_the_root_itself_is_refused(world, tmp_path):
    agent, root, _ = world
    os.symlink(root, tmp_path / "root_link")
    r = req(agent, tmp_path / "root_link", "read", "sub/a.txt", length=10)
    assert r["code"] == "path_refused", r


@pytest.mark.parametrize("path", ["..", "../outside/secret", "sub/../../outside/secret", "sub/..", ".",
                                  "./sub/a.txt", "sub//a.txt", "/etc/passwd", "sub/", "/", "sub/./a.txt"])
def test_dot_and_absolute_spellings_are_refused(world, path):
    agent, root, _ = world
    for op in ("read", "stat", "list", "remove"):
        r = req(agent, root, op, path, length=10)
        assert r["t"] == "error" and r["code"] == "path_refused", (op, r)


def test_relative_root_is_refused(world):
    agent, root, _ = world
    assert req(agent, "relative/root", "stat", "")["code"] == "path_refused"


def test_fifo_never_blocks_and_special_files_are_not_files(world):
    agent, root, _ = world
    os.mkfifo(root / "fifo")
    for op, kw in (("read", {"length": 10}), ("write", {"data": b64(b"x")})):
        r = req(agent, root, op, "fifo", **kw)
        assert r["t"] == "error" and r["code"] in ("not_a_file", "os_error"), r
    assert req(agent, root, "stat", "fifo")["type"] == "other"
    assert req(agent, root, "read", "sub", length=10)["code"] == "not_a_file"


def test_sizes_are_bounded(world):
    agent, root, _ = world
    r = req(agent, root, "read", "sub/a.txt", length=files_op.MAX_CHUNK + 1)
    assert r["code"] == "bad_message"
    r = req(agent, root, "write", "big", data=b64(b"x" * (files_op.MAX_CHUNK + 1)))
    assert r["code"] == "too_large" and not (root / "big").exists()
    (root / "big").write_bytes(os.urandom(3 * files_op.MAX_CHUNK // 2))
    r = req(agent, root, "read", "big", length=files_op.MAX_CHUNK)
    assert len(base64.b64decode(r["data"])) == files_op.MAX_CHUNK and r["eof"] is False
    r = req(agent, root, "read", "big", offset=files_op.MAX_CHUNK, length=files_op.MAX_CHUNK)
    assert r["eof"] is True


def test_list_pages_and_skips_names_that_are_not_utf8(world):
    agent, root, _ = world
    d = root / "many"
    d.mkdir()
    names = [f"{i:05d}-" + "n" * 200 for i in range(3000)]  # > one reply's budget
    for n in names:
        (d / n).touch()
    os.close(os.open(os.path.join(os.fsencode(d), b"bad-\xff"), os.O_CREAT | os.O_WRONLY))
    seen, after, pages, skipped = [], "", 0, 0
    while True:
        r = req(agent, root, "list", "many", after=after)
        seen += [e["name"] for e in r["entries"]]
        skipped += r["skipped"]
        pages += 1
        if not r["more"]:
            break
        after = r["entries"][-1]["name"]
    assert seen == names and pages > 1 and skipped >= 1


def test_the_root_cannot_be_removed(world):
    agent, root, _ = world
    assert req(agent, root, "remove", "")["code"] == "path_refused"
    assert root.is_dir()


def test_remove_of_a_tree_holding_links_leaves_their_targets(world):
    agent, root, outside = world
    assert req(agent, root, "remove", "sub")["t"] == "ok"
    assert (outside / "secret").read_text() == "SECRET" and outside.is_dir()


@pytest.mark.parametrize("msg", [
    {"op": "format_disk"}, {"op": "read", "path": 5}, {"op": "read", "root": "/", "path": "x"},
    {"op": "read", "root": "/", "path": "x", "length": -1}, {"op": "write", "root": "/", "path": "x", "data": "!!"},
    {"op": "list", "root": "/", "path": "x\x00y"},
])
def test_malformed_file_requests_get_bad_message(world, msg):
    agent, root, _ = world
    r = agent.client.request({"t": "file", "id": next(_ids), **msg})
    assert r["t"] == "error" and r["code"] == "bad_message", r
    assert agent.client.request({"t": "ping", "id": 5})["t"] == "pong"


_component = st.sampled_from(["..", ".", "", "sub", "a.txt", "link_dir", "x"]) | st.text(string.ascii_letters, min_size=1, max_size=5)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(_component, min_size=1, max_size=6))
def test_any_dot_or_empty_component_is_refused(world, parts):
    agent, root, _ = world
    path = "/".join(parts)
    r = req(agent, root, "stat", path)
    if any(p in ("..", ".", "") for p in parts) and path != "":
        assert r["code"] == "path_refused", (path, r)
    else:
        assert r["t"] == "ok" or r["code"] in ("not_found", "not_a_dir", "path_refused"), r
        if r["t"] == "error" and r["code"] == "path_refused":
            assert "link_dir" in parts[:-1], (path, r)


def test_another_mount_beneath_the_root_is_refused(agent, tmp_path):
    """RESOLVE_NO_XDEV: a guest could bind-mount its own root inside the share; nothing is read or
    listed across a mount. Here the root is '/', and /proc and /dev are other mounts."""
    assert os.stat("/proc").st_dev != os.stat("/").st_dev
    for op, path in (("list", "proc"), ("stat", "proc/self/status"), ("read", "proc/self/status"), ("list", "dev")):
        r = req(agent, "/", op, path, length=10)
        assert r["t"] == "error" and r["code"] == "path_refused" and "mount" in r["message"], (op, path, r)
    assert req(agent, "/", "stat", str(tmp_path).lstrip("/"))["type"] == "dir"

"""Sandbox.files end to end: one real capsem kernel (one VM) for the module. Files go through the
guest agent; the kernel's code (the attacker) plants links, FIFOs and '..' tricks in the shared
folder, and none of them takes a file operation outside the folder or writes through a link on
either side. Pure parts and a lying agent: test_sandbox_files_unit.py; the agent's request on its
own: test_sandbox_files_agent.py.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from capsem_kernel import files as files_mod

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def sb(image_dir, tmp_path_factory):
    from capsem_kernel import Sandbox
    tmp = tmp_path_factory.mktemp("sandbox_files")
    rt = tmp / "rt"
    rt.mkdir(mode=0o700)
    mp = pytest.MonkeyPatch()
    mp.setenv("CAPSEM_RUNTIME_DIR", str(rt))
    sandbox = Sandbox(timeout=300)
    try:
        yield sandbox
    finally:
        sandbox.close()
        mp.undo()


def test_write_read_list_remove_and_the_kernel_sees_it(sb):
    f = sb.files
    info = f.write("data/in.txt", "héllo\n")
    assert info.path == f"{sb.folder}/data/in.txt" and info.name == "in.txt"
    assert f.read("data/in.txt") == "héllo\n"
    assert f.read(f"{sb.folder}/data/in.txt", format="bytes") == "héllo\n".encode()
    ex = sb.run_code("print(open('data/in.txt').read().upper(), end=''); open('data/out.bin','wb').write(bytes(range(256)))")
    assert ex.error is None and ex.logs.stdout == ["HÉLLO\n"]
    assert f.read("data/out.bin", format="bytes") == bytes(range(256))
    listing = {e.name: (e.type, e.size) for e in f.list("data")}
    assert listing == {"in.txt": ("file", 7), "out.bin": ("file", 256)}
    assert f.exists("data/in.txt") and not f.exists("data/nope")
    f.write([{"path": "w/a", "data": b"A"}, {"path": "w/b", "data": "B"}])
    assert f.read("w/a") + f.read("w/b") == "AB"
    f.remove("data")
    assert not f.exists("data") and not (sb.folder / "data").exists()


def test_big_files_are_chunked_and_capped(sb):
    data = os.urandom(3 * files_mod.CHUNK + 123)
    sb.files.write("big.bin", data)
    assert sb.files.read("big.bin", format="bytes") == data
    assert sb.files.get_info("big.bin").size == len(data)
    with pytest.raises(files_mod.FilesError) as e:
        sb.files.read("big.bin", max_bytes=files_mod.CHUNK)
    assert e.value.code == "too_large"
    sb.files.remove("big.bin")


GUEST_LINK = """
import os
try:
    os.symlink('/etc/passwd', 'guest_link')
    print('made')
except OSError as e:
    print('refused', e.errno)
"""


def plant(folder):
    """Links in the folder can only come from the host user (the share guard refuses the guest's
    symlink calls): plant every kind there, as a user (or a tool of theirs) might."""
    trap = folder / "trap"
    (trap / "sub").mkdir(parents=True)
    (trap / "sub" / "ok.txt").write_text("ok")
    os.symlink("/etc/passwd", trap / "passwd_link")
    os.symlink("/", trap / "root_link")
    os.symlink("sub", trap / "sub_link")
    os.symlink("../..", trap / "sub" / "up_link")
    os.mkfifo(trap / "fifo")


def test_links_in_the_folder_are_never_followed(sb):
    assert sb.run_code(GUEST_LINK).logs.stdout[0].startswith("refused")  # the guest cannot make one
    plant(sb.folder)
    f = sb.files
    for path in ("trap/passwd_link", "trap/root_link/etc/passwd", "trap/sub_link/ok.txt", "trap/sub/up_link/etc/hosts"):
        with pytest.raises(files_mod.PathRefused, match="symbolic link"):
            f.read(path)
        with pytest.raises(files_mod.PathRefused):
            f.write(path, "PWNED")
    with pytest.raises(files_mod.PathRefused):
        f.list("trap/root_link")
    with pytest.raises(files_mod.FilesError) as e:
        f.read("trap/fifo")  # never blocks
    assert e.value.code == "not_a_file"
    kinds = {e.name: e.type for e in f.list("trap")}
    assert kinds == {"sub": "dir", "passwd_link": "symlink", "root_link": "symlink", "sub_link": "symlink",
                     "fifo": "other"}
    check = sb.run_code("import os; print(open('/etc/passwd').read().startswith('root:'), os.path.exists('/PWNED'))")
    assert check.logs.stdout == ["True False\n"]
    assert "PWNED" not in open("/etc/passwd").read() and not os.path.exists(sb.folder.parent / "etc")


def test_a_mount_the_guest_puts_in_the_folder_is_not_crossed(sb):
    r = sb.commands.run("mkdir -p bound && mount --bind / bound && ls bound/etc/passwd")
    assert r.exit_code == 0, r  # the guest is root in its VM: it can
    try:
        for call in (lambda: sb.files.read("bound/etc/passwd"), lambda: sb.files.list("bound"),
                     lambda: sb.files.write("bound/etc/x", "x")):
            with pytest.raises(files_mod.PathRefused, match="another mount"):
                call()
    finally:
        assert sb.commands.run("umount bound && rmdir bound").exit_code == 0


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "trap/../../etc/passwd", "/"])
def test_paths_outside_the_folder_are_refused(sb, path):
    with pytest.raises(files_mod.PathRefused):
        sb.files.read(path)


def test_download_dir_copies_only_files_and_folders(sb, tmp_path):
    out = tmp_path / "out"
    result = sb.files.download_dir("trap", out)
    assert (out / "sub" / "ok.txt").read_text() == "ok"
    assert sorted(os.listdir(out)) == ["sub"] and sorted(os.listdir(out / "sub")) == ["ok.txt"]
    assert result.files == 1 and len(result.skipped) == 5  # 4 links + the FIFO, never created here
    assert not any(os.path.islink(os.path.join(d, n)) for d, ds, fs in os.walk(out) for n in ds + fs)


def test_upload_dir_round_trip(sb, tmp_path):
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "f.txt").write_text("deep")
    (src / "top.bin").write_bytes(b"\x00\x01")
    os.symlink("/etc/passwd", src / "host_link")  # skipped: never followed on the host either
    result = sb.files.upload_dir(src, "up")
    assert result.files == 2 and result.skipped == [str(src / "host_link")]
    ex = sb.run_code("import pathlib; print(sorted(str(p) for p in pathlib.Path('up').rglob('*')))")
    assert ex.logs.stdout == ["['up/a', 'up/a/b', 'up/a/b/f.txt', 'up/top.bin']\n"]
    back = sb.files.download_dir("up", tmp_path / "back")
    assert back.files == 2 and (tmp_path / "back" / "a" / "b" / "f.txt").read_text() == "deep"


def test_async_files(sb):
    from capsem_kernel import AsyncSandbox

    async def go():
        a = AsyncSandbox(sb)
        await a.files.write("async.txt", "from asyncio")
        text = await a.files.read("async.txt")
        names = [e.name for e in await a.files.list("")]
        await a.files.remove("async.txt")
        return text, names, await a.files.exists("async.txt")
    text, names, exists = asyncio.run(go())
    assert text == "from asyncio" and "async.txt" in names and exists is False

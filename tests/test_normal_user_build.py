"""Image builds by a normal user, the parts that need no VM: what keeps a user from building a
rootfs without root is named (image/userns.py), build tools in sbin are found with a user's PATH,
the system's layers are reused read-only, and the unprivileged unpack skips device nodes (a user
namespace cannot make them). The end-to-end build as a user is in tests/test_normal_user.py."""

from __future__ import annotations

import io
import os
import pwd
import shlex
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from capsem_vm.errors import ImageError
from capsem_vm.image import rootfs, store, userns
from capsem_vm.image.progress import Progress, find_tool
from capsem_vm.image.recipe import Recipe

ALL_TOOLS = lambda name: f"/usr/bin/{name}"  # noqa: E731 - `which` for a host that has every tool


def host(tmp_path: Path, subuid: str | None = "u:100000:65536\n", subgid: str | None = "u:100000:65536\n",
         sysctl: dict[str, str] | None = None) -> userns.Host:
    etc, proc_sys = tmp_path / "etc", tmp_path / "proc_sys"
    etc.mkdir()
    for name, text in (("subuid", subuid), ("subgid", subgid)):
        if text is not None:
            (etc / name).write_text(text)
    for rel, value in (sysctl or {}).items():
        (proc_sys / rel).parent.mkdir(parents=True, exist_ok=True)
        (proc_sys / rel).write_text(value + "\n")
    return userns.Host("u", etc, proc_sys)


def test_a_user_with_everything_in_place_is_missing_nothing(tmp_path):
    assert userns.missing(host(tmp_path, sysctl={"kernel/unprivileged_userns_clone": "1",
                                                 "user/max_user_namespaces": "100",
                                                 "kernel/apparmor_restrict_unprivileged_userns": "0"}),
                          which=ALL_TOOLS) == []


@pytest.mark.parametrize("subuid, why", [
    (None, "no entry"),                                   # no file at all
    ("", "no entry"),
    ("other:100000:65536\n", "no entry"),
    (f"{os.getuid() + 4242}:100000:65536\n", "no entry"),  # a uid is not a name (mmdebstrap looks up names)
    ("u:100000:1000\n", "only 1000 ids"),
    ("u:x:65536\n", "no entry"),
    ("u:100000:65536:extra\n", "no entry"),
])
def test_each_subid_problem_is_named_with_roots_fix(tmp_path, subuid, why):
    problems = userns.missing(host(tmp_path, subuid=subuid), which=ALL_TOOLS)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{tmp_path / 'etc' / 'subuid'} has {why} for user 'u', 65536 needed")
    assert "usermod --add-subuids" in problems[0]


def test_the_suggested_range_is_free(tmp_path):
    problems = userns.missing(host(tmp_path, subuid="a:100000:65536\nb:300000:65536\n",
                                   subgid="a:100000:65536\n"), which=ALL_TOOLS)
    assert "usermod --add-subuids 365536-431071 u" in problems[0]
    assert "usermod --add-subgids 165536-231071 u" in problems[1]


@pytest.mark.parametrize("rel, value, words", [
    ("kernel/unprivileged_userns_clone", "0", "sysctl kernel.unprivileged_userns_clone=1"),
    ("user/max_user_namespaces", "0", "sysctl user.max_user_namespaces="),
    ("kernel/apparmor_restrict_unprivileged_userns", "1", "AppArmor restricts unprivileged user namespaces"),
])
def test_disabled_user_namespaces_are_named(tmp_path, rel, value, words):
    problems = userns.missing(host(tmp_path, sysctl={rel: value}), which=ALL_TOOLS)
    assert len(problems) == 1 and words in problems[0], problems


def test_missing_uidmap_is_named(tmp_path):
    problems = userns.missing(host(tmp_path), which=lambda name: None if name == "newgidmap" else f"/usr/bin/{name}")
    assert problems == ["newgidmap not installed (root: `apt-get install uidmap`)"]


def test_the_refusal_lists_everything_at_once(tmp_path):
    h = host(tmp_path, subuid=None, subgid=None, sysctl={"kernel/unprivileged_userns_clone": "0"})
    with pytest.raises(ImageError) as e:
        userns.check_unprivileged_build(h)
    text = str(e.value)
    assert "subuid" in text and "subgid" in text and "unprivileged_userns_clone=1" in text
    assert "sudo capsem image build" in e.value.hint


@given(st.text())
def test_reading_subid_files_is_total(text):
    assert userns.subid_count(text, "u") >= 0
    assert userns.free_range_start(text) >= 100000


def test_build_tools_in_sbin_are_found_with_a_users_path(monkeypatch, tmp_path):
    """depmod is /usr/sbin/depmod on Debian; a normal user's PATH has no sbin."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert find_tool("depmod") in ("/usr/sbin/depmod", "/sbin/depmod")
    progress = Progress(log_path=tmp_path / "log")
    progress.run(["depmod", "--version"])
    progress.close()
    with pytest.raises(ImageError, match="no-such-tool-xyz is not installed"):
        Progress().run(["no-such-tool-xyz"])


def test_the_users_layers_first_then_the_systems_read_only(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPSEM_CACHE_DIR", str(tmp_path / "user"))
    monkeypatch.setenv("CAPSEM_SYSTEM_CACHE_DIR", str(tmp_path / "system"))
    recipe = Recipe(apt=("jq",))
    assert rootfs.cached_rootfs(recipe) is None
    system = tmp_path / "system" / "layers" / "rootfs" / recipe.rootfs_key() / rootfs.ROOTFS_NAME
    system.parent.mkdir(parents=True)
    system.write_bytes(b"erofs")
    assert rootfs.cached_rootfs(recipe) == system
    own = tmp_path / "user" / "layers" / "rootfs" / recipe.rootfs_key() / rootfs.ROOTFS_NAME
    own.parent.mkdir(parents=True)
    own.write_bytes(b"erofs")
    assert rootfs.cached_rootfs(recipe) == own
    # root's cache is the system's: one candidate, not two
    monkeypatch.setenv("CAPSEM_SYSTEM_CACHE_DIR", str(tmp_path / "user"))
    assert store.layer_candidates("rootfs", "k") == [tmp_path / "user" / "layers" / "rootfs" / "k"]


def _tar_with_device_nodes(path: Path) -> None:
    with tarfile.open(path, "w") as tar:
        for name, kind in (("./dev", tarfile.DIRTYPE), ("./dev/null", tarfile.CHRTYPE), ("./etc", tarfile.DIRTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.mode = kind, 0o755 if kind == tarfile.DIRTYPE else 0o666
            info.devmajor, info.devminor = (1, 3) if kind == tarfile.CHRTYPE else (0, 0)
            tar.addfile(info)
        data = b"hello\n"
        info = tarfile.TarInfo("./etc/motd")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def test_the_unprivileged_unpack_skips_device_nodes_and_packs(tmp_path):
    """The command the unshare build runs, run for real by a user in a user namespace: on main tar
    stopped at the first device node (mknod is not allowed there)."""
    prefix, owner = _as_build_user()
    with tempfile.TemporaryDirectory(prefix="capsem-unpack-") as d:  # not pytest's 0700 basetemp
        work = Path(d)
        os.chmod(work, 0o755)
        _tar_with_device_nodes(work / "rootfs.tar")
        os.chown(work, owner.pw_uid, owner.pw_gid)
        os.chown(work / "rootfs.tar", owner.pw_uid, owner.pw_gid)
        argv = rootfs.unpack_and_pack_argv(work / "rootfs.tar", work / "tree", work / "out.erofs")
        out = subprocess.run(prefix + ["env", "-i", "PATH=/usr/bin:/bin", *argv], capture_output=True, text=True,
                             timeout=120, cwd="/")
        assert out.returncode == 0, (shlex.join(argv), out.stderr)
        assert (work / "out.erofs").stat().st_size > 0
        listing = subprocess.run(["fsck.erofs", "--extract=" + str(work / "x"), str(work / "out.erofs")],
                                 capture_output=True, text=True)
        subprocess.run(prefix + ["unshare", "--map-auto", "--map-root-user", "rm", "-rf", str(work / "tree")], check=True)
        assert listing.returncode == 0, listing.stderr
        assert sorted(p.name for p in (work / "x").iterdir()) == ["dev", "etc"]
        assert not list((work / "x" / "dev").iterdir()) and (work / "x" / "etc" / "motd").read_text() == "hello\n"


def _as_build_user() -> tuple[list[str], pwd.struct_passwd]:
    """(argv prefix, account) of a user who can build without root: capsemtest when we are root."""
    if os.geteuid() == 0:
        from test_kernel_user import USER, ensure_user
        ensure_user()
        return ["runuser", "-u", USER, "--"], pwd.getpwnam(USER)
    try:
        userns.check_unprivileged_build()
    except ImageError as exc:
        pytest.skip(f"this user cannot build without root: {exc}")
    return [], pwd.getpwuid(os.geteuid())


PROBE = "deb.example.invalid_debian_dists_x_main_binary-amd64_Packages"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["root", "unshare"])
def test_the_build_hooks_leave_mmdebstrap_its_apt_config(mode):
    """The rootfs build's own hooks, on the smallest Debian (essential; ~15 s each, Debian mirror):
    as root with the host's /var/lib/apt/lists a private tmpfs holding a probe list, and as a user
    in unshare mode. On main the clean-up hook removed the chroot's /tmp, where mmdebstrap keeps
    its apt.conf: its final `apt-get update` then used the host's apt state (as root it deleted
    the host's package lists, the probe here; as a user it failed on their lock)."""
    from capsem_vm.image.debian import host_mirrors
    if mode == "root":
        if os.geteuid() != 0:
            pytest.skip("root mode needs root")
        prefix, owner = [], pwd.getpwuid(0)
    else:
        prefix, owner = _as_build_user()
    with tempfile.TemporaryDirectory(prefix="capsem-hooks-") as d:
        work = Path(d)
        os.chmod(work, 0o755)
        os.chown(work, owner.pw_uid, owner.pw_gid)
        target = work / ("root" if mode == "root" else "root.tar")
        argv = rootfs.mmdebstrap_argv(Recipe(), host_mirrors(), mode, target)
        argv = ["--variant=essential" if a == "--variant=minbase" else a for a in argv if not a.startswith("--include=")]
        if mode == "root":  # the host's package lists replaced by a private tmpfs with a probe in it
            lists = "/var/lib/apt/lists"
            argv = ["unshare", "--mount", "--", "sh", "-c",
                    f"mount -t tmpfs none {lists} && touch {lists}/{PROBE} && {shlex.join(argv)} "
                    f"&& test -e {lists}/{PROBE} || {{ echo 'the host package lists were changed' >&2; exit 1; }}"]
        out = subprocess.run(prefix + ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", f"HOME={work}", *argv],
                             capture_output=True, text=True, timeout=240, cwd=work)
        assert out.returncode == 0, out.stderr[-3000:]
        if mode == "root":
            assert target.is_dir() and not list((target / "tmp").iterdir())
        else:
            names = tarfile.open(target).getnames()
            assert "./tmp" in names and not [n for n in names if n.startswith("./tmp/")], names

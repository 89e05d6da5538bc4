"""The rootfs trim step (capsem_vm/image/trim.py): which packages nothing needs any more."""

from capsem_vm.image.trim import parse_status, unneeded

STATUS = """\
Package: app
Status: install ok installed
Depends: libfoo (>= 1.0), python3:any

Package: python3
Status: install ok installed
Depends: libc6

Package: libc6
Status: install ok installed

Package: gcc
Status: install ok installed
Depends: gcc-12 (>= 12), cpp
 , binutils

Package: gcc-12
Status: install ok installed
Depends: binutils, libc6-dev | libc-dev

Package: cpp
Status: install ok installed

Package: binutils
Status: install ok installed

Package: libc6-dev
Status: install ok installed
Provides: libc-dev
Depends: libc6

Package: libfoo
Status: install ok installed
Pre-Depends: libbar

Package: libbar
Status: install ok installed

Package: gone
Status: deinstall ok config-files
Depends: gcc
"""

TOOLCHAIN = ("gcc", "gcc-12", "cpp", "binutils", "libc6-dev", "libbar", "absent")


def test_parse_status_reads_installed_packages_and_continuation_lines():
    pkgs = parse_status(STATUS)
    assert "gone" not in pkgs
    assert pkgs["gcc"]["depends"] == [["gcc-12"], ["cpp"], ["binutils"]]
    assert pkgs["gcc-12"]["depends"] == [["binutils"], ["libc6-dev", "libc-dev"]]
    assert pkgs["libc6-dev"]["provides"] == ["libc-dev"]
    assert pkgs["app"]["depends"] == [["libfoo"], ["python3"]]


def test_only_what_nothing_left_needs_is_unneeded():
    pkgs = parse_status(STATUS)
    # libbar stays: libfoo (kept) pre-depends on it. "absent" is not installed: ignored.
    assert unneeded(pkgs, TOOLCHAIN) == ["binutils", "cpp", "gcc", "gcc-12", "libc6-dev"]


def test_kept_packages_keep_their_dependencies():
    pkgs = parse_status(STATUS)
    assert unneeded(pkgs, TOOLCHAIN, keep=("gcc",)) == []
    assert unneeded(pkgs, TOOLCHAIN, keep=("binutils",)) == ["cpp", "gcc", "gcc-12", "libc6-dev"]


def test_virtual_dependencies_count():
    pkgs = parse_status(STATUS + "\nPackage: headers-user\nStatus: install ok installed\nDepends: libc-dev\n")
    assert "libc6-dev" not in unneeded(pkgs, TOOLCHAIN)

"""capsem_vm.dirfile.DirFile: the files a frozen dataclass names below its directory."""
import dataclasses
from pathlib import Path

import pytest

from capsem_vm.config import RuntimePaths
from capsem_vm.dirfile import DirFile
from capsem_vm.image.linux import KernelLayer


def test_names_a_file_below_the_objects_directory_and_stays_read_only():
    paths = RuntimePaths(Path("/run/vm1"))
    assert (paths.qmp, paths.console_log, paths.vsock_backend, paths.vsock_uds, paths.owner, paths.pids) == tuple(
        Path("/run/vm1") / n for n in ("qmp.sock", "console.log", "vsock.vu", "v.sock", "owner", "pids"))
    assert paths.fs_socket("ws") == Path("/run/vm1/fs-ws.vu")
    assert isinstance(RuntimePaths.qmp, DirFile)  # on the class: the descriptor itself
    assert [f.name for f in dataclasses.fields(RuntimePaths)] == ["root"]  # not dataclass fields
    assert paths == RuntimePaths(Path("/run/vm1")) and hash(paths) == hash(RuntimePaths(Path("/run/vm1")))
    with pytest.raises(dataclasses.FrozenInstanceError):
        paths.qmp = Path("/elsewhere")  # type: ignore[misc]


def test_of_names_another_directory_attribute():
    layer = KernelLayer(Path("/layers/k"), "linux-image-x=1", "x")
    assert (layer.vmlinuz, layer.vmlinux, layer.modules) == (Path("/layers/k/vmlinuz"), Path("/layers/k/vmlinux"),
                                                             Path("/layers/k/root"))

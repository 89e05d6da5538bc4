"""DirFile: a read-only attribute naming one file in an object's directory, for the classes that
name the files of a directory they own (a VM's runtime dir, an image layer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, overload


class DirFile:
    """`qmp = DirFile("qmp.sock")` in a class whose `root` is a Path: `obj.qmp == obj.root / "qmp.sock"`.
    `of` names the directory attribute when it is not `root`."""

    def __init__(self, name: str, of: str = "root"):
        self.name, self.of = name, of

    @overload
    def __get__(self, obj: None, owner: type) -> DirFile: ...
    @overload
    def __get__(self, obj: object, owner: type) -> Path: ...
    def __get__(self, obj: Any, owner: type) -> Path | DirFile:
        return self if obj is None else getattr(obj, self.of) / self.name

"""Names that make a version-control repository, and the repositories a folder already holds.

Host tools run code from a repository's configuration: `git status` (also run by shell prompts
and jupyterlab-git) runs `core.fsmonitor`, other commands run hooks, filters, aliases, pagers,
`core.sshCommand`. Git finds a repository in a directory through an entry named `.git` (a
directory, or a file saying `gitdir: PATH`) or, for a bare repository, because the directory
itself holds a `HEAD` file plus `objects/` and `refs/` (safe.bareRepository defaults to `all`).
Mercurial runs hooks from `.hg/hgrc`. So a guest that can give anything in the share one of
these names can make the host user's next `git status` run its command. The share guard
(share_guard.py) refuses to create such names; `existing_repositories` lists what the folder
already holds, which virtiofs.py makes read-only.

The comparison is deliberately wider than Linux git's own: any letter case and compatibility
spelling (case-insensitive and casefolded filesystems), ignoring the code points HFS+ ignores,
with trailing dots and spaces and NTFS stream suffixes cut (what git's core.protectNTFS /
core.protectHFS refuse), and the NTFS short name `git~1`.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

REPOSITORY_NAMES = {".git": "a git repository or gitdir file", "git~1": "the NTFS short name of .git",
                    "head": "a bare git repository's HEAD", ".hg": "a Mercurial repository"}
MAX_DIRS = 50_000  # existing_repositories: a folder with more directories is refused, not half-checked


def _fold(name: str) -> str:
    if name.isascii():  # the common case, fast (existing_repositories folds every name in a tree)
        return name.lower().split(":", 1)[0].rstrip(". ")
    text = unicodedata.normalize("NFKC", name)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")  # zero-width joiners, BOM, ...
    text = unicodedata.normalize("NFKC", text.casefold())
    return text.split(":", 1)[0].rstrip(". ")


def repository_name(name: bytes | str) -> str | None:
    """Why giving an entry this name (one path component) could make a repository, or None."""
    if isinstance(name, bytes):
        name = name.decode("utf-8", "surrogateescape")
    return REPOSITORY_NAMES.get(_fold(name))


def last_component(path: bytes) -> bytes:
    """The name a call creates: the last non-empty component of `path` (mkdir("a/.git/") makes .git)."""
    parts = [p for p in path.split(b"/") if p]
    return parts[-1] if parts else b""


class TooManyDirectories(Exception):
    pass


def existing_repositories(root: Path, max_dirs: int = MAX_DIRS) -> list[Path]:
    """What under `root` is (part of) a repository already: every entry named like `.git` (directory
    or gitdir file), `.hg`, and every directory holding an entry named like `HEAD` (a git directory,
    or one that planted `objects/`, `refs/` and `config` beside would make one). Symlinks are not
    followed; nothing below a listed directory is listed. Raises TooManyDirectories past max_dirs."""
    found: list[Path] = []
    stack = [root]
    seen = 0
    while stack:
        d = stack.pop()
        seen += 1
        if seen > max_dirs:
            raise TooManyDirectories(f"{root} has more than {max_dirs} directories")
        try:
            entries = list(os.scandir(d))
        except (PermissionError, FileNotFoundError, NotADirectoryError):
            continue
        if any(repository_name(e.name) == REPOSITORY_NAMES["head"] for e in entries):
            found.append(Path(d))
            continue
        for e in entries:
            if repository_name(e.name) is not None and (e.is_dir(follow_symlinks=False)
                                                        or e.is_file(follow_symlinks=False)):
                found.append(Path(e.path))
            elif e.is_dir(follow_symlinks=False):
                stack.append(Path(e.path))
    return sorted(found)

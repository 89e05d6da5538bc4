"""`Sandbox.files`: files of the sandbox's folder, through the guest agent (E2B's `files` shape).

    sb.files.write("data/in.csv", "a,b\\n1,2\\n")
    sb.files.read("data/in.csv")                 # str; format="bytes" for bytes
    sb.files.list("data")                        # [EntryInfo(name, path, type, size, ...)]
    sb.files.download_dir("out", "./results")

Every operation is a `file` request to the guest agent on the VM's control connection
(capsem_agent/files_op.py), never host-side access to the share: the guest controls the share's
contents, and host access would follow the guest's links. The agent resolves each path beneath the
folder with no link followed; here a path is first reduced to its components within the folder
(absolute paths elsewhere and any '..' are refused before anything is sent).

The agent's replies are guest bytes: every field is checked (types, sizes, names) and a reply
that breaks the contract raises AgentReplyError; sizes are bounded both ways (a per-call cap,
`max_bytes`, and 512 KiB chunks). download_dir writes only beneath local_dir, through directory
fds opened with O_NOFOLLOW, from names checked by `safe_name`; it never creates a link.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

CHUNK = 512 * 1024            # raw bytes per request (capsem_agent.files_op.MAX_CHUNK)
MAX_BYTES = 256 * 1024 * 1024  # default per-call cap on a file's (or a directory's) bytes
MAX_ENTRIES = 100_000         # entries per list / upload_dir / download_dir call
MAX_DEPTH = 64                # directory depth of upload_dir / download_dir
MAX_NAME = 255
REQUEST_TIMEOUT = 90.0        # one request (the agent gives up on a chunk after 60 s)
TYPES = ("file", "dir", "symlink", "other")


class FilesError(RuntimeError):
    """A file operation failed; `code` is the agent's (or this module's) stable reason code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class PathRefused(FilesError, PermissionError):
    """The path leaves the folder, spells '..', or has a symbolic link on it."""


class FileNotFound(FilesError, FileNotFoundError):
    pass


class AgentReplyError(FilesError):
    """The guest agent's reply broke the protocol (the guest is hostile: nothing of it is used)."""

    def __init__(self, message: str):
        super().__init__("bad_reply", f"the guest agent's reply is invalid: {message}")


def _escape(text: Any, limit: int = 300) -> str:
    from capsem_vm import safetext
    return safetext.escape(str(text)[:limit])


# --- pure helpers -------------------------------------------------------------------------------

def folder_relative(path: str | os.PathLike, folder: str | os.PathLike) -> str:
    """`path` (relative to the folder, or absolute within it) as the agent's relative path
    ('' is the folder itself). Refuses NUL, any '..' and absolute paths outside the folder."""
    text = os.fspath(path)
    if not isinstance(text, str):
        raise PathRefused("path_refused", "paths are text")
    if "\x00" in text:
        raise PathRefused("path_refused", "a path cannot contain NUL")
    p = PurePosixPath(text)
    if p.is_absolute():
        root = PurePosixPath(os.fspath(folder))
        if p.parts[: len(root.parts)] != root.parts:
            raise PathRefused("path_refused", f"{_escape(text)} is outside the sandbox folder {root}")
        parts = p.parts[len(root.parts):]
    else:
        parts = p.parts
    if ".." in parts:
        raise PathRefused("path_refused", f"{_escape(text)}: '..' is refused (paths stay in the folder)")
    for part in parts:
        if len(part.encode("utf-8", "surrogatepass")) > MAX_NAME:
            raise PathRefused("path_refused", "a path component is longer than 255 bytes")
    return "/".join(parts)  # PurePosixPath dropped '.' and empty components


def safe_name(name: Any) -> bool:
    """A directory entry name from the guest that is safe to create on the host: one component."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
            and "\x00" not in name and len(name.encode("utf-8", "surrogatepass")) <= MAX_NAME)


def _int(reply: dict, key: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    v = reply.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise AgentReplyError(f"{key!r} is not an integer in [{lo}, {hi}]")
    return v


def _bool(reply: dict, key: str) -> bool:
    v = reply.get(key)
    if not isinstance(v, bool):
        raise AgentReplyError(f"{key!r} is not a boolean")
    return v


def parse_read(reply: Any, asked: int) -> tuple[bytes, int, bool]:
    """(data, size, eof) of a read reply; data is at most `asked` bytes."""
    if not isinstance(reply, dict):
        raise AgentReplyError("not an object")
    raw = reply.get("data")
    if not isinstance(raw, str) or len(raw) > 4 * ((asked + 2) // 3):
        raise AgentReplyError("'data' is not base64 of at most the asked length")
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise AgentReplyError("'data' is not valid base64") from None
    if len(data) > asked:
        raise AgentReplyError("more data than asked for")
    return data, _int(reply, "size"), _bool(reply, "eof")


def parse_info(reply: Any) -> dict:
    """{type, size, mode, mtime} of a stat reply or a list entry."""
    if not isinstance(reply, dict):
        raise AgentReplyError("not an object")
    kind = reply.get("type")
    if kind not in TYPES:
        raise AgentReplyError("'type' is not one of " + ", ".join(TYPES))
    return {"type": kind, "size": _int(reply, "size"), "mode": _int(reply, "mode", hi=0o7777),
            "mtime": _int(reply, "mtime", lo=-(2**62), hi=2**62)}


def parse_list(reply: Any, after: str) -> tuple[list[dict], bool, int]:
    """(entries [{name, type, size, mode, mtime}], more, skipped) of a list reply: names safe,
    unique, sorted and after `after` (so paging always moves forward)."""
    if not isinstance(reply, dict) or not isinstance(reply.get("entries"), list):
        raise AgentReplyError("'entries' is not a list")
    entries, last = [], after
    for e in reply["entries"]:
        if not isinstance(e, dict) or not safe_name(e.get("name")):
            raise AgentReplyError("an entry's name is not a single safe path component")
        if e["name"] <= last:
            raise AgentReplyError("entries are not sorted, repeat, or do not follow the cursor")
        last = e["name"]
        entries.append({"name": e["name"], **parse_info(e)})
    more = _bool(reply, "more")
    if more and not entries:
        raise AgentReplyError("'more' without entries")
    return entries, more, _int(reply, "skipped")


@dataclass
class EntryInfo:
    """E2B's EntryInfo fields that apply: type is 'file', 'dir', 'symlink' or 'other'."""
    name: str
    path: str
    type: str
    size: int
    mode: int
    modified_time: int


@dataclass
class WriteInfo:
    name: str
    path: str
    type: str = "file"


@dataclass
class Transfer:
    """What upload_dir / download_dir did."""
    files: int = 0
    dirs: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)  # links and special files (never copied)


# --- the API --------------------------------------------------------------------------------------

_ERRORS = {"path_refused": PathRefused, "not_found": FileNotFound}


class Files:
    def __init__(self, sandbox, chunk: int = CHUNK):
        self._sandbox = sandbox
        self.chunk = chunk  # smaller for a Ray-placed sandbox: each request is one control message

    @property
    def root(self) -> str:
        return str(self._sandbox.folder)  # the share's guest path is the host path

    def _rel(self, path) -> str:
        return folder_relative(path, self.root)

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def _request(self, op: str, rel: str, **fields) -> dict:
        from capsem_vm.control import RemoteError
        from capsem_vm.errors import ProtocolError, VMError

        from . import loop_thread
        from .sandbox import SandboxError
        control = self._sandbox._control()
        msg = {"t": "file", "op": op, "root": self.root, "path": rel, **fields}
        try:
            reply = loop_thread.run_sync(control.request(msg, timeout=REQUEST_TIMEOUT), REQUEST_TIMEOUT + 5)
        except RemoteError as exc:
            message = str(exc).split(": ", 1)[-1]
            raise _ERRORS.get(exc.code, FilesError)(_escape(exc.code, 40), _escape(message)) from None
        except (VMError, ProtocolError, TimeoutError) as exc:  # the connection (and VM) is gone
            raise SandboxError(f"file {op} failed: {_escape(exc)}") from None
        return reply

    # --- single files ---------------------------------------------------------------------------

    def read(self, path, format: str = "text", max_bytes: int = MAX_BYTES) -> str | bytes:
        """The file's content (text: UTF-8, undecodable bytes replaced). FilesError(too_large) past
        max_bytes."""
        if format not in ("text", "bytes"):
            raise ValueError("format is 'text' or 'bytes'")
        data = self._read_bytes(self._rel(path), max_bytes)
        return data.decode("utf-8", "replace") if format == "text" else data

    def _read_bytes(self, rel: str, max_bytes: int) -> bytes:
        if max_bytes < 0:
            raise FilesError("too_large", f"{_escape(rel)}: past max_bytes")
        out = bytearray()
        while True:
            asked = min(self.chunk, max_bytes + 1 - len(out))
            data, _size, eof = parse_read(self._request("read", rel, offset=len(out), length=asked), asked)
            out += data
            if len(out) > max_bytes:
                raise FilesError("too_large", f"{_escape(rel)} is larger than max_bytes ({max_bytes})")
            if eof or not data:  # no data and no eof would loop forever: a lying agent ends here
                return bytes(out)

    def write(self, path, data: str | bytes | None = None, max_bytes: int = MAX_BYTES):
        """Write (create or replace) a file, creating missing parent folders. `path` may instead be
        a list of {"path", "data"} entries (E2B's WriteEntry): a list of WriteInfo comes back."""
        if isinstance(path, list):
            return [self.write(e["path"], e["data"], max_bytes) for e in path]
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError("data is str or bytes")
        data = bytes(data)
        if len(data) > max_bytes:
            raise FilesError("too_large", f"{len(data)} bytes is more than max_bytes ({max_bytes})")
        rel = self._rel(path)
        offset = 0
        while True:  # the first request truncates (and creates), later ones append at their offset
            piece = data[offset:offset + self.chunk]
            self._request("write", rel, offset=offset, data=base64.b64encode(piece).decode("ascii"),
                          truncate=offset == 0, parents=True)
            offset += len(piece)
            if offset >= len(data):
                break
        return WriteInfo(name=PurePosixPath(rel).name, path=self._path(rel))

    def get_info(self, path) -> EntryInfo:
        rel = self._rel(path)
        info = parse_info(self._request("stat", rel))
        return EntryInfo(PurePosixPath(rel).name, self._path(rel), info["type"], info["size"],
                         info["mode"], info["mtime"])

    def exists(self, path) -> bool:
        try:
            self.get_info(path)
            return True
        except FileNotFound:
            return False

    def make_dir(self, path) -> bool:
        """Create the folder and missing parents; False if it already existed."""
        reply = self._request("mkdir", self._rel(path), parents=True)
        return _bool(reply, "created")

    def remove(self, path) -> None:
        """Remove a file, a link (never its target) or a folder with everything in it."""
        rel = self._rel(path)
        if not rel:
            raise PathRefused("path_refused", "the sandbox folder itself cannot be removed")
        self._request("remove", rel)

    def list(self, path="", max_entries: int = MAX_ENTRIES) -> list[EntryInfo]:
        """The folder's entries, sorted by name (links are listed as type 'symlink', not followed)."""
        rel = self._rel(path)
        return [EntryInfo(e["name"], self._path(f"{rel}/{e['name']}" if rel else e["name"]), e["type"],
                          e["size"], e["mode"], e["mtime"]) for e in self._entries(rel, max_entries)]

    def _entries(self, rel: str, max_entries: int) -> list[dict]:
        entries: list[dict] = []
        after = ""
        while True:
            page, more, _skipped = parse_list(self._request("list", rel, after=after), after)
            entries += page
            if len(entries) > max_entries:
                raise FilesError("too_large", f"{_escape(rel) or 'the folder'} has more than {max_entries} entries")
            if not more:
                return entries
            after = page[-1]["name"]

    # --- whole directories ------------------------------------------------------------------------

    def upload_dir(self, local_dir, remote_dir, max_bytes: int = MAX_BYTES) -> Transfer:
        """Copy a host folder's files and folders into the sandbox folder at remote_dir. Links and
        special files are skipped (listed in the result), never followed."""
        local = Path(local_dir)
        if not local.is_dir():
            raise NotADirectoryError(f"{local} is not a directory")
        base = self._rel(remote_dir)
        result = Transfer()
        self.make_dir(base) if base else None
        for dirpath, dirnames, filenames in os.walk(local, followlinks=False):
            sub = Path(dirpath).relative_to(local)
            if len(sub.parts) > MAX_DEPTH:
                raise FilesError("too_large", f"{local} is deeper than {MAX_DEPTH} levels")
            for name in sorted(dirnames) + sorted(filenames):
                src = Path(dirpath, name)
                dest = "/".join(p for p in (base, *sub.parts, name) if p)
                st = src.lstat()
                if result.files + result.dirs >= MAX_ENTRIES:
                    raise FilesError("too_large", f"{local} has more than {MAX_ENTRIES} entries")
                if stat.S_ISDIR(st.st_mode):
                    self._request("mkdir", dest, parents=True)
                    result.dirs += 1
                elif stat.S_ISREG(st.st_mode):
                    if result.bytes + st.st_size > max_bytes:
                        raise FilesError("too_large", f"{local} holds more than max_bytes ({max_bytes})")
                    data = src.read_bytes()
                    self.write(dest, data, max_bytes)
                    result.files += 1
                    result.bytes += len(data)
                else:
                    result.skipped.append(str(src))
        return result

    def download_dir(self, remote_dir, local_dir, max_bytes: int = MAX_BYTES) -> Transfer:
        """Copy the sandbox folder's remote_dir into local_dir (created if missing). Only regular
        files and folders are copied; every host write is beneath local_dir, through directory fds
        with no link followed, and existing files there are replaced, never written through."""
        base = self._rel(remote_dir)
        local = Path(local_dir)
        local.mkdir(parents=True, exist_ok=True)
        result = Transfer()
        top = os.open(local, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._download(base, top, 0, result, max_bytes)
        finally:
            os.close(top)
        return result

    def _download(self, rel: str, dir_fd: int, depth: int, result: Transfer, max_bytes: int) -> None:
        if depth > MAX_DEPTH:
            raise FilesError("too_large", f"{_escape(rel)} is deeper than {MAX_DEPTH} levels")
        for e in self._entries(rel, MAX_ENTRIES):
            name = e["name"]  # parse_list checked it is one safe component
            sub = f"{rel}/{name}" if rel else name
            if result.files + result.dirs >= MAX_ENTRIES:
                raise FilesError("too_large", f"more than {MAX_ENTRIES} entries")
            if e["type"] == "dir":
                try:
                    os.mkdir(name, 0o755, dir_fd=dir_fd)
                except FileExistsError:
                    pass
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                try:
                    result.dirs += 1
                    self._download(sub, child, depth + 1, result, max_bytes)
                finally:
                    os.close(child)
            elif e["type"] == "file":
                data = self._read_bytes(sub, max_bytes - result.bytes)
                _write_beneath(dir_fd, name, data)
                result.files += 1
                result.bytes += len(data)
            else:
                result.skipped.append(self._path(sub))


def _write_beneath(dir_fd: int, name: str, data: bytes) -> None:
    """Replace dir_fd/name with a regular file holding data: an existing link or file there is
    unlinked first, and O_EXCL|O_NOFOLLOW makes sure nothing else is written through."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(f"{name} is a directory on the host")
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    with os.fdopen(fd, "wb") as f:
        f.write(data)

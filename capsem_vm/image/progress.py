"""Build progress: stage names with elapsed seconds; tool output only with --verbose (otherwise
it goes to a log file whose tail is shown when a step fails)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from capsem_vm.errors import ImageError


# Build tools a normal user's PATH lacks on Debian (depmod lives in /usr/sbin) but may run.
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"


def find_tool(name: str) -> str | None:
    """The tool's path: from PATH, else from the sbin directories (None if neither has it)."""
    return shutil.which(name) or shutil.which(name, path=SBIN_PATH)


class Progress:
    def __init__(self, verbose: bool = False, log_path: Path | None = None, out=None):
        self.verbose = verbose
        self.out = out or sys.stderr
        self.start = time.monotonic()
        self.log_path = log_path
        self._log = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(log_path, "w")

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def say(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {message}", file=self.out, flush=True)
        if self._log:
            print(f"### {message}", file=self._log, flush=True)

    @contextmanager
    def stage(self, name: str):
        self.say(f"{name} ...")
        t0 = time.monotonic()
        yield
        self.say(f"{name}: done in {time.monotonic() - t0:.1f}s")

    def run(self, argv: list[str], cwd: Path | None = None, env=None) -> None:
        """Run a tool; its output goes to the terminal (verbose) or the log file."""
        if self._log:
            print(f"$ {' '.join(map(str, argv))}", file=self._log, flush=True)
        target = None if self.verbose else (self._log or subprocess.DEVNULL)
        tool = find_tool(str(argv[0]))
        if tool is None:
            raise ImageError(f"{argv[0]} is not installed", "run `capsem setup` as root")
        try:
            proc = subprocess.run([tool, *map(str, argv[1:])], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                  stdout=target, stderr=subprocess.STDOUT if target else None)
        except FileNotFoundError:
            raise ImageError(f"{argv[0]} is not installed", "run `capsem setup` as root")
        if proc.returncode != 0:
            raise ImageError(f"`{' '.join(map(str, argv[:3]))} ...` failed (exit {proc.returncode})"
                             + self._tail(), self._hint())

    def _tail(self, lines: int = 25) -> str:
        if not self._log or self.verbose:
            return ""
        self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\n  | " + "\n  | ".join(text)

    def _hint(self) -> str:
        where = f"; full log: {self.log_path}" if self._log else ""
        return f"re-run with --verbose to see the tool output{where}"

    def close(self) -> None:
        if self._log:
            self._log.close()
            self._log = None

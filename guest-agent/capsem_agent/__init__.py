"""The capsem guest agent: runs as PID 1 in the VM (Python stdlib only)."""

__version__ = "0.1.0"

# Guest uptimes (s) of the agent's own start-up steps, reported in hello's "boot" (see protocol.py).
BOOT_MARKS: dict[str, float] = {}


def boot_mark(name: str) -> None:
    try:
        with open("/proc/uptime", "rb") as f:
            BOOT_MARKS[name] = float(f.read(64).split()[0])
    except (OSError, ValueError, IndexError):
        pass

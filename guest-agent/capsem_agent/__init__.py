"""The capsem guest agent: runs as PID 1 in the VM (Python stdlib only)."""

__version__ = "0.1.0"

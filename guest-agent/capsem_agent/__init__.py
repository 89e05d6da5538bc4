"""The capsem guest agent: runs as PID 1 in the VM (Python stdlib only)."""

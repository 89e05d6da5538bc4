"""Streaming secret scrubber (pure): replaces secret byte strings in a body that arrives in chunks."""

from __future__ import annotations


class Scrubber:
    """Streaming replace of secret byte strings, correct across chunk boundaries."""

    def __init__(self, pairs: list[tuple[bytes, bytes]], on_bytes=None):
        self.pairs = [(s, p) for s, p in pairs if s]
        self.keep = max((len(s) for s, _ in self.pairs), default=1) - 1
        self.buf = b""
        self.on_bytes = on_bytes

    def __call__(self, chunk: bytes) -> bytes:
        if self.on_bytes:
            self.on_bytes(len(chunk))
        if not self.pairs:
            return chunk  # the common case: only counting
        data = self.buf + chunk
        for secret, placeholder in self.pairs:
            data = data.replace(secret, placeholder)
        if chunk and self.keep:
            # hold back a tail that could be the start of a secret
            cut = max(0, len(data) - self.keep)
            data, self.buf = data[:cut], data[cut:]
        else:
            self.buf = b""
        return data

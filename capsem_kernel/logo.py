"""The capsem logo (a two-tone capsule) drawn as PNG with the stdlib: no image files to ship."""

from __future__ import annotations

import struct
import zlib

TEAL = (0, 150, 136, 255)
NAVY = (26, 35, 126, 255)
CLEAR = (0, 0, 0, 0)


def _pixel(x: float, y: float, size: int) -> tuple[int, int, int, int]:
    # A horizontal capsule: a rectangle with two half-discs, tilted 45 degrees.
    c = size / 2
    u, v = ((x - c) + (y - c)) / 2 ** 0.5, ((y - c) - (x - c)) / 2 ** 0.5
    r = size * 0.2
    half = size * 0.27
    du = max(abs(u) - half, 0)
    if du * du + v * v > r * r:
        return CLEAR
    return TEAL if u < 0 else NAVY


def png(size: int) -> bytes:
    rows = b"".join(b"\x00" + b"".join(bytes(_pixel(x + 0.5, y + 0.5, size)) for x in range(size))
                    for y in range(size))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")

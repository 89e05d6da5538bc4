"""The pool's messages, pure (no I/O): encode/decode, flavours, which VM a claim gets, how many
VMs to boot. Carried one message per SOCK_SEQPACKET datagram (seqpacket.py), so there is no
framing: a datagram is one JSON object of at most MAX_MESSAGE bytes, file descriptors ride
along as SCM_RIGHTS.

Everything decoded here may come from a hostile or broken peer (a keeper whose VM misbehaved,
another process of the same user): sizes are bounded, types checked, unknown types refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from capsem_agent import protocol

MAX_MESSAGE = 64 * 1024
TYPES = frozenset({
    "claim", "status", "stop",          # client -> pool
    "vm", "none", "ok", "error",        # pool/keeper -> client
    "ready", "handover", "info",        # keeper <-> owner
    "kill", "died",                     # owner -> keeper: kill the VM now; keeper -> owner: why it ended
})
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
ACCELS = ("auto", "kvm", "tcg")
MEMORY_MB = (256, 1 << 20)  # what a flavour may ask for
CPUS = (1, 64)


class WireError(ValueError):
    """A message that is not one of ours (malformed, too big, wrong types)."""


def encode(msg: dict) -> bytes:
    if not isinstance(msg.get("t"), str) or msg["t"] not in TYPES:
        raise WireError(f"unknown message type {msg.get('t')!r}")
    data = json.dumps(msg, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise WireError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return data


def decode(data: bytes) -> dict:
    if not data:
        raise WireError("empty message")
    if len(data) > MAX_MESSAGE:
        raise WireError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    try:
        msg = protocol.strict_loads(data)  # no huge ints, NaN, duplicate keys, lone surrogates
    except ValueError as exc:
        raise WireError(f"not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise WireError("not a JSON object")
    t = msg.get("t")
    if not isinstance(t, str) or t not in TYPES:
        raise WireError(f"unknown message type {str(t)[:40]!r}")
    return msg


def get_int(msg: dict, key: str, lo: int, hi: int, default: int | None = None) -> int:
    v = msg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise WireError(f"{key!r} must be an integer in {lo}..{hi}")
    return v


def get_str(msg: dict, key: str, max_len: int = 4096, default: str | None = None) -> str:
    v = msg.get(key, default)
    if not isinstance(v, str) or len(v) > max_len:
        raise WireError(f"{key!r} must be a string of at most {max_len} characters")
    return v


@dataclass(frozen=True)
class Flavour:
    """What a kernel asks of its VM. image_digest: sha256 of the image manifest (its identity)."""

    memory_mb: int
    cpus: int
    image_digest: str
    accel: str = "auto"

    def to_wire(self) -> dict:
        return {"memory_mb": self.memory_mb, "cpus": self.cpus, "image_digest": self.image_digest,
                "accel": self.accel}

    @classmethod
    def from_wire(cls, d) -> "Flavour":
        if not isinstance(d, dict):
            raise WireError("flavour must be an object")
        digest = get_str(d, "image_digest", 64)
        if not _DIGEST.match(digest):
            raise WireError("image_digest must be 64 lowercase hex digits")
        accel = get_str(d, "accel", 8, "auto")
        if accel not in ACCELS:
            raise WireError(f"accel must be one of {ACCELS}")
        return cls(get_int(d, "memory_mb", *MEMORY_MB), get_int(d, "cpus", *CPUS), digest, accel)

    def serves(self, wanted: "Flavour") -> bool:
        """Can a VM of this (booted: accel is kvm or tcg) flavour serve `wanted`?"""
        return (self.memory_mb == wanted.memory_mb and self.cpus == wanted.cpus
                and self.image_digest == wanted.image_digest
                and wanted.accel in ("auto", self.accel))


@dataclass(frozen=True)
class Slot:
    """One pooled VM as the pool's bookkeeping sees it."""

    id: str
    state: str       # booting | ready
    born: float      # monotonic seconds
    flavour: Flavour | None = None  # known once ready


def pick(slots: list[Slot], wanted: Flavour) -> str | None:
    """The oldest ready VM that serves `wanted` (oldest first: its page cache is warmest)."""
    ready = [s for s in slots if s.state == "ready" and s.flavour is not None and s.flavour.serves(wanted)]
    return min(ready, key=lambda s: s.born).id if ready else None


@dataclass(frozen=True)
class Shape:
    """What the pool keeps warm of one flavour: `size` VMs of `memory_mb` and `cpus`, booted from
    `image` (a name or directory; None: the pool's image). The accelerator is the pool's."""

    memory_mb: int
    cpus: int
    size: int
    image: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Shape":
        """'MB,CPUS,N' or 'MB,CPUS,N,IMAGE' (--flavour)."""
        parts = text.split(",", 3)
        try:
            if len(parts) < 3:
                raise ValueError
            memory_mb, cpus, size = (int(p) for p in parts[:3])
        except ValueError:
            raise WireError(f"flavour {text!r}: expected MEMORY_MB,CPUS,COUNT[,IMAGE], e.g. 2048,2,1") from None
        image = parts[3] if len(parts) == 4 else None
        if image is not None and not image.strip():
            raise WireError(f"flavour {text!r}: the image after the third comma is empty")
        return cls.checked(memory_mb, cpus, size, image)

    @classmethod
    def checked(cls, memory_mb: int, cpus: int, size: int, image: str | None = None) -> "Shape":
        """Within what a claim's flavour may ask for (Flavour.from_wire)."""
        if not (MEMORY_MB[0] <= memory_mb <= MEMORY_MB[1] and CPUS[0] <= cpus <= CPUS[1] and 0 <= size <= 1000):
            raise WireError(f"flavour '{memory_mb},{cpus},{size}': memory {MEMORY_MB[0]}..{MEMORY_MB[1]} MB, "
                            f"{CPUS[0]}..{CPUS[1]} CPUs, count 0..1000")
        return cls(memory_mb, cpus, size, image)

    def label(self) -> str:
        return f"{self.size} x {self.memory_mb} MB/{self.cpus} CPUs" + (f" ({self.image})" if self.image else "")


def plan_boots(shapes: list[Shape], ready: list[int], booting: list[int], budget_mb: int,
               max_parallel: int) -> list[int]:
    """Which flavours to boot one more VM of now (indexes into `shapes`, one entry per VM, taken
    in turn so that no flavour waits for another to fill): each up to its size, never more than
    `max_parallel` boots at once, never beyond the memory budget (all pooled VMs, booting or
    ready, x their memory)."""
    counts = [r + b for r, b in zip(ready, booting)]
    used = sum(c * s.memory_mb for c, s in zip(counts, shapes))
    in_flight = sum(booting)
    plan: list[int] = []
    added = True
    while added and in_flight < max_parallel:
        added = False
        for i, shape in enumerate(shapes):
            if in_flight < max_parallel and counts[i] < shape.size and used + shape.memory_mb <= budget_mb:
                plan.append(i)
                counts[i] += 1
                used += shape.memory_mb
                in_flight += 1
                added = True
    return plan


def backoff(failures: int, cap: float = 120.0) -> float:
    """Seconds to wait before the next boot after `failures` boots in a row never became ready."""
    return 0.0 if failures <= 0 else min(cap, 2.0 ** min(failures, 16))

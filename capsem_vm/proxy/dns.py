"""Sans-IO DNS: parse one query, build one answer. Pure functions over bytes, bounded sizes.

Only what a stub resolver in the guest needs: one question per query, class IN. The guest never
learns real addresses: allowed names get a synthetic IPv4 (see synthetic.py); AAAA and every other
type get an empty NOERROR answer (no IPv6 in the guest); denied names get NXDOMAIN.
Nothing here raises on hostile input: parse_query returns a Query or a DnsParseError's rcode.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

MAX_QUERY = 1024        # a real query (name <= 255 bytes + EDNS OPT) is far smaller
MAX_NAME_WIRE = 255
HEADER = struct.Struct(">HHHHHH")

QR = 0x8000
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5

TYPE_A, TYPE_CNAME, TYPE_AAAA, TYPE_ANY = 1, 5, 28, 255
CLASS_IN = 1
TYPE_NAMES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
              33: "SRV", 64: "SVCB", 65: "HTTPS", 255: "ANY"}


@dataclass(frozen=True)
class Query:
    id: int
    flags: int
    name: str            # as asked, decoded (labels joined by '.'), not normalized
    qtype: int
    qclass: int
    question: bytes      # the raw question section, echoed back verbatim (keeps 0x20 case)

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.qtype, str(self.qtype))


class DnsParseError(ValueError):
    """The query is malformed. `rcode` is what to answer; `qid` None means: drop it silently."""

    def __init__(self, message: str, rcode: int = FORMERR, qid: int | None = None, flags: int = 0):
        super().__init__(message)
        self.rcode, self.qid, self.flags = rcode, qid, flags


def _read_name(data: bytes, pos: int) -> tuple[str, int]:
    labels = []
    total = 0
    while True:
        if pos >= len(data):
            raise DnsParseError("name runs past the end")
        n = data[pos]
        if n & 0xC0:
            # why: compression pointers make no sense in a one-question query; refusing them
            # removes the classic pointer-loop and out-of-bounds bugs
            raise DnsParseError("compression pointer or extended label in question")
        pos += 1
        if n == 0:
            break
        if pos + n > len(data):
            raise DnsParseError("label runs past the end")
        label = data[pos:pos + n]
        pos += n
        total += n + 1
        if total + 1 > MAX_NAME_WIRE:
            raise DnsParseError("name longer than 255 bytes")
        try:
            text = label.decode("ascii")
        except UnicodeDecodeError:
            text = label.decode("latin-1")  # kept only to be refused by the name check later
        labels.append(text)
    return ".".join(labels), pos


def parse_query(data: bytes) -> Query:
    """Parse a DNS query. Raises DnsParseError (with the rcode to answer, or qid None to drop)."""
    if len(data) < HEADER.size:
        raise DnsParseError("shorter than a DNS header")
    qid, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(data)
    if flags & QR:
        raise DnsParseError("not a query")  # qid None: never answer a response (reflection loops)
    if len(data) > MAX_QUERY:
        raise DnsParseError("query too large", FORMERR, qid, flags)
    opcode = (flags >> 11) & 0xF
    if opcode != 0:
        raise DnsParseError("only standard queries", NOTIMP, qid, flags)
    if qdcount != 1 or ancount != 0 or nscount != 0:
        raise DnsParseError("exactly one question expected", FORMERR, qid, flags)
    try:
        name, pos = _read_name(data, HEADER.size)
    except DnsParseError as exc:
        raise DnsParseError(str(exc), FORMERR, qid, flags) from None
    if pos + 4 > len(data):
        raise DnsParseError("question truncated", FORMERR, qid, flags)
    qtype, qclass = struct.unpack_from(">HH", data, pos)
    return Query(qid, flags, name, qtype, qclass, bytes(data[HEADER.size:pos + 4]))


def _header(qid: int, query_flags: int, rcode: int, qd: int, an: int) -> bytes:
    flags = QR | AA | RA | (query_flags & RD) | (rcode & 0xF)
    return HEADER.pack(qid, flags, qd, an, 0, 0)


def build_error(qid: int, query_flags: int, rcode: int) -> bytes:
    """An answer without a question section (for queries we could not parse)."""
    return _header(qid, query_flags, rcode, 0, 0)


def build_response(q: Query, rcode: int = NOERROR, a_records: list[str] = (), ttl: int = 300) -> bytes:
    """Answer `q`. a_records are IPv4 strings, only used for NOERROR."""
    answers = b""
    n = 0
    if rcode == NOERROR:
        for ip in a_records:
            rdata = ipaddress.IPv4Address(ip).packed
            # 0xC00C: pointer to the name in the echoed question at offset 12
            answers += struct.pack(">HHHIH", 0xC00C, TYPE_A, CLASS_IN, ttl, 4) + rdata
            n += 1
    return _header(q.id, q.flags, rcode, 1, n) + q.question + answers


# --- reading answers (used by tests and by the guest-side resolver as a reference) --------------

def parse_response(data: bytes) -> tuple[int, int, list[str]]:
    """(id, rcode, [IPv4 answers]). Strict enough for our own answers; raises ValueError."""
    qid, flags, qd, an, _, _ = HEADER.unpack_from(data)
    if not flags & QR:
        raise ValueError("not a response")
    pos = HEADER.size
    for _ in range(qd):
        _, pos = _read_name(data, pos)
        pos += 4
    ips = []
    for _ in range(an):
        if data[pos] & 0xC0 == 0xC0:
            pos += 2
        else:
            _, pos = _read_name(data, pos)
        rtype, _, _, rdlen = struct.unpack_from(">HHIH", data, pos)
        pos += 10
        rdata = data[pos:pos + rdlen]
        if len(rdata) != rdlen:
            raise ValueError("truncated answer")
        pos += rdlen
        if rtype == TYPE_A and rdlen == 4:
            ips.append(str(ipaddress.IPv4Address(rdata)))
    return qid, flags & 0xF, ips


def build_query(name: str, qtype: int = TYPE_A, qid: int = 0x1234) -> bytes:
    """A standard recursive query (tests; the guest resolver's reference encoding)."""
    wire = b"".join(bytes([len(lbl)]) + lbl.encode("ascii") for lbl in name.rstrip(".").split(".") if lbl)
    return HEADER.pack(qid, RD, 1, 0, 0, 0) + wire + b"\x00" + struct.pack(">HH", qtype, CLASS_IN)

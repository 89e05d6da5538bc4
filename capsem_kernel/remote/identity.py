"""Per-kernel TLS identities and pinned mutual-TLS contexts for the remote tunnel.

Each side of a remote kernel (the front end, the node) makes its own identity per kernel: an EC
P-256 key and a self-signed certificate. Only the certificate crosses Ray (its traffic is not
encrypted); each side pins the other's certificate exactly:

- during the handshake: the peer's certificate is the only trust anchor of the context (a self-
  signed certificate is its own issuer), so any other certificate fails verification and the
  handshake is refused with an alert, in both directions;
- right after it, before a byte of application data: `check_peer` compares the SHA-256 of the
  peer's DER certificate with the pinned fingerprint (a second certificate signed with the same
  key and names would pass chain verification, but not this).

TLS 1.3 only, no session tickets (no resumption: every connection presents its certificate).
The private key lives in this process only: hidden from repr/str, and a TlsIdentity refuses to be
pickled (so it cannot be shipped through Ray by mistake); `public()` is what may cross.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import ssl
import tempfile
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALIDITY = datetime.timedelta(days=365)   # pinning, not expiry, is what authenticates
CLOCK_SKEW = datetime.timedelta(hours=1)  # nodes' clocks may lag the front end's
MAX_PEM = 16 << 10                        # a P-256 self-signed cert is ~600 bytes


class IdentityError(ValueError):
    """A certificate or fingerprint is malformed, or a peer does not match its pin."""


@dataclass(frozen=True)
class TlsIdentity:
    cert_pem: bytes                           # public: may cross Ray
    key_pem: bytes = field(repr=False)        # private: never leaves this process
    fingerprint: str = ""                     # sha256 hex of the DER cert

    @classmethod
    def generate(cls, common_name: str) -> "TlsIdentity":
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64] or "capsem")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(name).issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - CLOCK_SKEW)
                .not_valid_after(now + VALIDITY)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cls(cert_pem, key_pem, fingerprint_of(cert_pem))

    def __repr__(self) -> str:
        return f"TlsIdentity(fingerprint={self.fingerprint!r}, key=<private>)"

    __str__ = __repr__

    def public(self) -> dict:
        """What may cross Ray: the certificate and its fingerprint."""
        return {"cert_pem": self.cert_pem, "fingerprint": self.fingerprint}

    def __reduce_ex__(self, protocol):
        raise TypeError("a TlsIdentity holds a private key and is never pickled: "
                        "send identity.public() (cert_pem, fingerprint) instead")


def _load_cert(cert_pem: bytes) -> x509.Certificate:
    if not isinstance(cert_pem, (bytes, bytearray)) or len(cert_pem) > MAX_PEM:
        raise IdentityError("certificate must be PEM bytes of at most %d bytes" % MAX_PEM)
    try:
        return x509.load_pem_x509_certificate(bytes(cert_pem))
    except (ValueError, TypeError) as e:
        raise IdentityError(f"not a PEM certificate: {e}") from None


def fingerprint_of(cert_pem: bytes) -> str:
    """SHA-256 (lowercase hex) of the certificate's DER encoding."""
    der = _load_cert(cert_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def check_fingerprint(fingerprint: str) -> str:
    if (not isinstance(fingerprint, str) or len(fingerprint) != 64
            or any(c not in "0123456789abcdef" for c in fingerprint)):
        raise IdentityError("a fingerprint is 64 lowercase hex digits (sha256 of the DER cert)")
    return fingerprint


def check_peer(ssl_object, peer_fingerprint: str) -> None:
    """Raise IdentityError unless the connection's peer presented exactly the pinned cert."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise IdentityError("the peer presented no certificate")
    if ssl_object.version() != "TLSv1.3":
        raise IdentityError(f"TLS 1.3 only, the connection is {ssl_object.version()}")
    got = hashlib.sha256(der).hexdigest()
    if not hmac.compare_digest(got, peer_fingerprint):
        raise IdentityError("the peer's certificate is not the pinned one")


def _base_context(purpose: int, identity: TlsIdentity, peer_cert_pem: bytes) -> ssl.SSLContext:
    if not isinstance(identity, TlsIdentity):
        raise IdentityError("identity must be a TlsIdentity")
    _load_cert(peer_cert_pem)                        # malformed pins fail here, not in OpenSSL
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False                       # no names: the pin is the identity
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_TICKET
    ctx.load_verify_locations(cadata=bytes(peer_cert_pem).decode("ascii"))
    _load_chain(ctx, identity)
    return ctx


def _load_chain(ctx: ssl.SSLContext, identity: TlsIdentity) -> None:
    """ssl loads keys only from paths: use an anonymous memory file (never on disk), or, where
    there is none, a file in a fresh 0700 directory removed at once."""
    blob = identity.cert_pem + identity.key_pem
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("capsem-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, blob)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    d = tempfile.mkdtemp(prefix="capsem-tls-")        # 0700
    path = os.path.join(d, "chain.pem")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        ctx.load_cert_chain(path)
    finally:
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(d)


def server_context(identity: TlsIdentity, peer_cert_pem: bytes) -> ssl.SSLContext:
    """The node's side: presents `identity`, requires the client to present exactly
    `peer_cert_pem` (also check `check_peer` after the handshake: the tunnel does)."""
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER, identity, peer_cert_pem)
    ctx.num_tickets = 0
    return ctx


def client_context(identity: TlsIdentity, peer_cert_pem: bytes) -> ssl.SSLContext:
    """The front end's side: presents `identity`, accepts only a server presenting exactly
    `peer_cert_pem` (plus `check_peer` after the handshake)."""
    return _base_context(ssl.PROTOCOL_TLS_CLIENT, identity, peer_cert_pem)

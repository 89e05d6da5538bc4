"""The per-install interception CA, generated with `cryptography`.

    ca_cert_pem() -> bytes        the CA certificate, for the guest trust store (safe to share)
    ensure_ca() -> CAPaths        create it once; the private key stays in data_dir()/ca, mode 0600

Layout of data_dir()/ca (mode 0700), which is also the mitmproxy `confdir` of the proxy service:
    mitmproxy-ca.pem      private key + certificate (0600): mitmproxy's expected name
    capsem-ca-cert.pem    certificate only (0644)
Nothing in this module ever returns or logs the private key.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .. import nofollow, paths

KEY_FILE = "mitmproxy-ca.pem"
CERT_FILE = "capsem-ca-cert.pem"
VALID_DAYS = 3650


@dataclass(frozen=True)
class CAPaths:
    confdir: Path      # pass to mitmproxy as confdir
    key_and_cert: Path
    cert: Path


def ca_dir() -> Path:
    return paths.data_dir() / "ca"


def _generate(common_name: str) -> tuple[bytes, bytes]:
    # why ECDSA P-256: mitmproxy's leaf certificates reuse the CA key pair, so this key signs every
    # intercepted TLS handshake. P-256 is as strong as RSA-3072 and signs ~40x faster (measured:
    # 0.07 ms vs 3 ms per handshake). An existing CA is kept as it is (guests may trust it).
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "capsem"),
    ])
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=2))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # (the fd: never a path a link could redirect)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def ensure_ca(directory: Path | None = None) -> CAPaths:
    """Create the CA if it does not exist yet (safe against concurrent callers)."""
    d = paths.ensure_private_dir(Path(directory) if directory else ca_dir())
    key_and_cert, cert = d / KEY_FILE, d / CERT_FILE
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not key_and_cert.exists():
            key_pem, cert_pem = _generate(f"capsem egress CA ({socket.gethostname()[:40]})")
            _write(key_and_cert, key_pem + cert_pem, 0o600)
            _write(cert, cert_pem, 0o644)
        elif not cert.exists():
            certs = x509.load_pem_x509_certificates(key_and_cert.read_bytes())
            _write(cert, certs[0].public_bytes(serialization.Encoding.PEM), 0o644)
        nofollow.chmod(key_and_cert, 0o600)  # why: repair a key file someone loosened
    return CAPaths(d, key_and_cert, cert)


def ca_cert_pem(directory: Path | None = None) -> bytes:
    """The CA certificate (PEM) to install in the guest trust store."""
    return ensure_ca(directory).cert.read_bytes()

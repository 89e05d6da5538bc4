"""Trust the host's interception CA in the guest (certificate only: the key never leaves the host).

The certificate goes to /usr/local/share/ca-certificates/capsem-egress.crt (kept by a later
update-ca-certificates) and is appended to the system bundle /etc/ssl/certs/ca-certificates.crt
(what OpenSSL, Python, curl, git, pip and requests read), between marker lines so a second setup
replaces it instead of piling up. Running update-ca-certificates itself takes seconds under TCG.
"""

from __future__ import annotations

import os
import re

BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
CERT_FILE = "/usr/local/share/ca-certificates/capsem-egress.crt"
MAX_PEM = 64 * 1024
BEGIN_MARK = "# capsem egress CA: begin\n"
END_MARK = "# capsem egress CA: end\n"
_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+-----END CERTIFICATE-----\r?\n?")


class TrustError(ValueError):
    pass


def check_pem(pem: str) -> str:
    """Exactly one or more PEM certificates and nothing else (in particular no private key)."""
    if not isinstance(pem, str) or not 0 < len(pem) <= MAX_PEM:
        raise TrustError(f"CA certificate must be 1..{MAX_PEM} characters of PEM")
    if "PRIVATE KEY" in pem:
        raise TrustError("refusing a CA bundle that contains a private key")
    certs = _PEM_CERT.findall(pem)
    if not certs or _PEM_CERT.sub("", pem).strip():
        raise TrustError("CA certificate is not PEM certificate text")
    return "".join(c if c.endswith("\n") else c + "\n" for c in certs)


def _write(path: str, text: str, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.capsem-tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def install(pem: str, bundle: str = BUNDLE, cert_file: str = CERT_FILE) -> str:
    """Install the CA; returns the path of the file holding only the capsem CA."""
    pem = check_pem(pem)
    _write(cert_file, pem)
    try:
        with open(bundle) as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    start = text.find(BEGIN_MARK)
    if start >= 0:
        end = text.find(END_MARK, start)
        text = text[:start] + (text[end + len(END_MARK):] if end >= 0 else "")
    if text and not text.endswith("\n"):
        text += "\n"
    _write(bundle, text + BEGIN_MARK + pem + END_MARK)
    return cert_file

"""Ed25519 image signing: the user's key (created on first use) and trusted public keys."""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from capsem_vm import paths
from capsem_vm.errors import ImageError

SIGNATURE_SIZE = 64


def signing_dir() -> Path:
    return paths.data_dir() / "signing"


def ensure_signing_key() -> tuple[Ed25519PrivateKey, Path]:
    """(private key, public key PEM path); generated on first use (key 0600, dir 0700)."""
    directory = paths.ensure_private_dir(signing_dir())
    key_path, pub_path = directory / "ed25519.key", directory / "ed25519.pub"
    if key_path.exists():
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError) as e:
            raise ImageError(f"cannot load the signing key {key_path}: {e}",
                             "move the broken file away; a new key is created on next use")
        if not isinstance(key, Ed25519PrivateKey):
            raise ImageError(f"{key_path} is not an Ed25519 key", "move it away; a new key is created on next use")
    else:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        # O_EXCL + mode at creation: the private key is never readable by others, even briefly.
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
    if not pub_path.exists():
        pub_path.write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key, pub_path


def public_key_b64(key: Ed25519PublicKey) -> str:
    return base64.b64encode(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def load_trusted_key(spec: str) -> Ed25519PublicKey:
    """A public key from a PEM file path, a file holding raw base64, or raw base64 itself."""
    hint = "pass the signer's public key as printed by `capsem image key` (PEM file or base64)"
    path = Path(spec).expanduser()
    text = spec
    if path.is_file():
        data = path.read_bytes()
        if b"-----BEGIN" in data:
            try:
                key = serialization.load_pem_public_key(data)
            except ValueError as e:
                raise ImageError(f"cannot read public key {path}: {e}", hint)
            if not isinstance(key, Ed25519PublicKey):
                raise ImageError(f"{path} is not an Ed25519 public key", hint)
            return key
        text = data.decode(errors="replace")
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ImageError(f"{spec!r} is neither a PEM public key file nor a base64 Ed25519 key", hint)
    return Ed25519PublicKey.from_public_bytes(raw)


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    return key.sign(data)


def check_signature(public: Ed25519PublicKey, data: bytes, signature: bytes, what: str) -> None:
    try:
        public.verify(signature, data)
    except InvalidSignature:
        raise ImageError(f"{what}: the signature does not match the trusted key (wrong key, or the "
                         "manifest was altered)", "get the image and the signer's public key again "
                         "from a source you trust; nothing was installed")

"""Errors that reach users: each says what went wrong and what to do about it."""


class CapsemError(Exception):
    """Base error. `hint` tells the user how to fix it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class MissingHelperError(CapsemError):
    """A host program (QEMU, virtiofsd, vhost-device-vsock, ...) is not installed."""


class ImageError(CapsemError):
    """A VM image is missing, incomplete or fails verification."""


class AssetVerificationError(ImageError):
    """An asset's hash or size differs from the manifest."""

    def __init__(self, name: str, expected: str, actual: str, hint: str | None = None):
        super().__init__(
            f"VM asset {name!r} failed verification: expected sha256 {expected}, got {actual}",
            hint or "the image was changed after it was built; rebuild it with `capsem image build`"
            " or re-import a trusted copy",
        )
        self.name = name
        self.expected = expected
        self.actual = actual


class VMError(CapsemError):
    """A VM failed to start, or died."""


class ProtocolError(CapsemError):
    """The guest sent something that breaks the control protocol."""

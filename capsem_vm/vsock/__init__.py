"""vsock between host and guest: one interface, two backends.

- `VhostUserTransport`: rust-vmm's vhost-device-vsock; the host side is plain Unix sockets. Works
  without /dev/vhost-vsock (as on our CI hosts).
- `KernelTransport`: the kernel's vhost-vsock (`vhost-vsock-pci`) and AF_VSOCK sockets on the host.

The guest sees plain AF_VSOCK either way.
"""

from .base import VsockTransport, select_transport

__all__ = ["VsockTransport", "select_transport"]

"""What a Jupyter kernel's host side (capsem_kernel.kernel_vm.KernelVM) needs from a VM.

Two classes implement it, and KernelVM drives either without knowing which:
- capsem_vm.vm.VM boots a VM of its own (a cold start);
- capsem_vm.pool.claimed.ClaimedVM takes over a VM that a pool keeper booted (a warm start): the
  keeper's process owns QEMU, `qemu` stands for it, and the notebook folder is attached after
  start() returned (`attaching`, `attach_gate`).
mypy checks both against `GuestVM` in `make unit` (pyproject.toml, [tool.mypy]).

The lifecycle: set `on_event`, `await start()`; from then on `control` (the guest agent),
`transport` (vsock) and `qemu` are there, `alive()` says whether QEMU and the agent still are;
`await stop()` (idempotent, never raises for a VM that is already gone).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # the types only: no import of the VM's machinery for readers of the contract
    from .accel import AccelChoice
    from .config import RuntimePaths, VMConfig
    from .control import ControlConnection
    from .egress import Egress
    from .vsock import VsockTransport

# Events from the agent ({"t": "kernel_exit", ...}, {"t": "closed"} when its connection is lost) and
# from QEMU's monitor ({"t": "vm_shutdown", "event": "SHUTDOWN" | "RESET", "reason": ...}).
OnEvent = Callable[[dict[str, Any]], None]


class QemuWatch(Protocol):
    """QEMU's process; for a claimed VM, the keeper that owns it (it exits when QEMU does)."""

    @property
    def pid(self) -> int: ...

    def alive(self) -> bool: ...

    async def wait(self) -> int | None: ...


class GuestVM(Protocol):
    config: VMConfig
    on_event: OnEvent | None  # set by KernelVM before start()

    # known once start() returned (None before)
    accel: AccelChoice | None
    image_digest: str | None
    hello: dict[str, Any] | None  # the agent's hello (its boot timings under "boot")
    control: ControlConnection | None  # the guest agent
    egress: Egress | None  # with config.egress
    timings: dict[str, float]
    shutdown_reason: str | None  # why QEMU said the guest ended (its SHUTDOWN event's reason, e.g. "guest-reset")
    # the notebook folder of a claimed VM, attached after start(): None for a cold VM (mounted in start())
    attaching: asyncio.Task[None] | None

    # read-only: a claimed VM's are of narrower types than a cold one's
    @property
    def paths(self) -> RuntimePaths | None: ...

    @property
    def transport(self) -> VsockTransport | None: ...

    @property
    def qemu(self) -> QemuWatch | None:
        """QEMU's process; for a claimed VM, the keeper that owns it."""

    @property
    def attach_gate(self) -> asyncio.Event | None:
        """Set by the caller when the kernel's first reply went out: a claimed VM's attach may begin."""

    async def start(self) -> GuestVM: ...

    async def stop(self, grace: float = 10.0) -> None: ...

    def alive(self) -> bool: ...

    def take_channel_stream(self, name: str) -> socket.socket | None:
        """A stream to the guest's channel relay opened before start() for this kernel channel
        (taken once), or None."""

"""The contract between KernelVM and its VM (capsem_vm/vm_protocol.py): how KernelVM reads the
events a VM passes on. (That VM and ClaimedVM fulfil the contract is checked by mypy in `make unit`.)"""

from __future__ import annotations

from capsem_kernel.kernel_vm import VM_DIED, KernelVM
from capsem_vm.config import VMConfig


def test_qemu_saying_the_guest_ended_makes_the_kernel_dead():
    kvm = KernelVM(VMConfig())
    assert kvm.poll() is None and kvm.state == "booting"
    kvm._on_event({"t": "vm_shutdown", "event": "SHUTDOWN", "reason": "guest-reset"})
    assert kvm.poll() == VM_DIED and kvm.exited.is_set() and kvm.state == "dead"


def test_the_kernels_own_exit_code_stays_when_the_vm_ends_after_it():
    kvm = KernelVM(VMConfig())
    kvm._on_event({"t": "kernel_exit", "code": 3})
    kvm._on_event({"t": "vm_shutdown", "event": "SHUTDOWN", "reason": "guest-shutdown"})
    kvm._on_event({"t": "closed"})
    assert kvm.poll() == 3


def test_info_names_why_the_vm_ended():
    kvm = KernelVM(VMConfig())
    assert kvm.info()["shutdown_reason"] is None
    kvm.vm._on_monitor_event("SHUTDOWN", {"guest": True, "reason": "guest-panic"})
    assert kvm.info()["shutdown_reason"] == "guest-panic" and kvm.poll() == VM_DIED

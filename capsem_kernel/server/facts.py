"""VM facts of one kernel, read from its kernel manager's provisioner. No I/O beyond attribute reads.

The provisioner's KernelVM lives on the capsem loop thread; the values read here (ints, strings, a
dict copy) are only displayed, so reading them from the server's thread is fine.
"""

from __future__ import annotations

import time
from typing import Any

from ..kernelspec import PROVISIONER_NAME
from ..provisioner import CapsemProvisioner


class NotCapsem(Exception):
    """The kernel exists but does not run in a capsem VM."""


def _spec_provisioner_name(km: Any) -> str | None:
    try:
        spec = km.kernel_spec
    except Exception:  # the kernelspec may be gone since the kernel started
        return None
    metadata = getattr(spec, "metadata", None) or {}
    return (metadata.get("kernel_provisioner") or {}).get("provisioner_name")


def capsem_provisioner(km: Any) -> CapsemProvisioner | None:
    """The kernel's CapsemProvisioner; None for a capsem kernel without one (not launched yet, or
    shut down). Raises NotCapsem for any other kernel."""
    prov = getattr(km, "provisioner", None)
    if isinstance(prov, CapsemProvisioner):
        return prov
    if prov is None and _spec_provisioner_name(km) == PROVISIONER_NAME:
        return None
    raise NotCapsem(getattr(km, "kernel_name", "") or "")


def is_capsem(km: Any) -> bool:
    try:
        capsem_provisioner(km)
    except NotCapsem:
        return False
    return True


def vm_state(prov: CapsemProvisioner | None) -> str:
    """booting | ready | dead, as the sandbox (not ipykernel's busy/idle) sees it."""
    if prov is None:
        return "dead"
    kv = prov.kernel_vm
    if kv is None:
        return "booting"  # launch_kernel has not created the VM yet
    kv.poll()  # notices a VM that died without telling
    return kv.state


def accel_label(accel: str | None) -> str | None:
    return {"kvm": "KVM", "tcg": "emulated (TCG)"}.get(accel or "", accel)


def kernel_facts(kernel_id: str, km: Any, now: float | None = None) -> dict:
    """The JSON of GET /capsem/kernels/<id>. Raises NotCapsem for other kernels."""
    prov = capsem_provisioner(km)
    now = time.time() if now is None else now
    out: dict[str, Any] = {
        "kernel_id": kernel_id,
        "capsem": True,
        "kernel_name": getattr(km, "kernel_name", None),
        "state": vm_state(prov),
        "accel": None, "accel_label": None, "memory_mb": None, "cpus": None, "shares": [],
        "image_digest": None, "started_at": None, "ready_at": None, "boot_seconds": None,
        "uptime_seconds": None, "kernel_pid": None, "policy_path": None,
        "proxy": None,  # the egress proxy service's supervision state, when the kernel uses it
        "death_reason": None,  # why the VM died: a helper it could not live without, or QEMU
        "shutdown_reason": None,  # QEMU's reason, when the guest powered off or reset itself
        "runtime_dir": None,  # the VM's own dir (logs, sockets): where to look when it misbehaves
        "pooled": None,  # True: a warm VM claimed from `capsem pool`; False: booted for this kernel
    }
    if prov is None:
        return out
    out["memory_mb"], out["cpus"] = prov.memory_mb, prov.cpus
    out["share_mode"] = prov.share_mode
    out["policy_path"] = prov.policy or None
    kv = prov.kernel_vm
    if kv is None:
        return out
    info = kv.info()
    out.update({
        "accel": info.get("accel"),
        "accel_label": accel_label(info.get("accel")),
        "memory_mb": info.get("memory_mb"),
        "cpus": info.get("cpus"),
        "image_digest": info.get("image_digest"),
        "kernel_pid": info.get("kernel_pid"),
        "started_at": info.get("started_at"),
        "ready_at": info.get("ready_at"),
        "boot_seconds": (info.get("timings") or {}).get("ready_s"),
        "shares": [{"path": s.get("path"), "mode": "ro" if s.get("readonly") else "rw"}
                   for s in info.get("shares") or []],
        "proxy": (info.get("egress") or {}).get("proxy_service"),  # supervisor.py: state()
        "death_reason": info.get("death_reason"),
        "shutdown_reason": info.get("shutdown_reason"),
        "runtime_dir": info.get("runtime_dir"),
        "pooled": info.get("pooled"),
    })
    if out["started_at"] and out["state"] != "dead":
        out["uptime_seconds"] = max(0.0, now - out["started_at"])
    return out

"""RayCapsemProvisioner: CapsemProvisioner's kernels, each placed on a node of a Ray cluster.

    capsem kernel install --ray ray://head:10001      # or an address `ray.init` takes, e.g. auto

Each launch places one CapsemNode actor (node.py) on a node with a free `capsem` resource, checks
that the node sees the notebook folder at the same path, exchanges public certificates through
Ray, connects the mutual-TLS tunnel (capsem_kernel/remote/) and sends the key and the policy text
inside it, then writes a connection file whose five ports are the tunnel's local listeners. A
restart places a fresh actor (possibly on another node); cleanup ends the actor.

The lifecycle (poll, wait, signals, kill, cleanup, info) is CapsemProvisioner's: `kernel_vm` is a
RemoteKernel (remote_kernel.py), which has KernelVM's surface.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.localinterfaces import is_local_ip
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Bool, Dict, Float, Unicode

from .. import loop_thread
from ..channels import PORT_KEYS
from ..provisioner import CapsemProvisioner

PROVISIONER_NAME = "capsem-ray-provisioner"
STOP_TIMEOUT = 30.0  # the actor's own teardown after a clean stop
MAX_POLICY = 60_000  # bytes of policy text sent to the node (one control message)


class RayCapsemProvisioner(CapsemProvisioner):
    ray_address = Unicode("auto", config=True,
                          help="The Ray cluster (an address ray.init takes: 'auto', 'HOST:PORT', 'ray://HOST:PORT').")
    placement_timeout = Float(120.0, config=True,
                              help="Seconds to wait for a node with a free 'capsem' resource; then the start fails.")
    node_resources = Dict(config=True, help="More resources the node must have, e.g. {'capsem-node-a': 0.001}.")
    node_folder = Bool(False, config=True,
                       help="Share a fresh node-local folder instead of the notebook folder (Sandbox without a "
                            "folder; the files API reaches it).")

    placed_node: dict[str, Any] | None = None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        km = self.parent
        if km.transport != "tcp" or not is_local_ip(km.ip):
            raise RuntimeError(f"capsem kernels listen on a local TCP address; got {km.transport}://{km.ip}")
        kwargs.pop("extra_arguments", None)
        # why not CapsemProvisioner.pre_launch: the ports are the tunnel's, known only once it is open
        return await KernelProvisionerBase.pre_launch(self, cmd=list(self.kernel_spec.argv), **kwargs)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        from . import placement
        from .remote_kernel import RemoteKernel
        from ..remote.identity import TlsIdentity
        km = self.parent
        cwd = str(Path(kwargs.get("cwd") or os.getcwd()).resolve())
        env = kwargs.get("env") or {}
        policy = await asyncio.to_thread(read_policy, self.policy, None if self.node_folder else cwd)  # a bad policy fails before placement
        actor, facts = await asyncio.to_thread(placement.place, self.ray_address, self.placement_timeout,
                                               dict(self.node_resources))
        node = facts.get("node")
        try:
            if not self.node_folder:
                await asyncio.to_thread(placement.check_folder, actor, cwd, node)
            identity = TlsIdentity.generate(f"capsem-front-{self.kernel_id}")
            prepared = await asyncio.to_thread(_ray_get, actor.prepare.remote(self.kernel_id, identity.cert_pem), 60)
        except BaseException:
            placement.kill(actor)
            raise
        self.placed_node = {"node": node, "node_id": facts.get("node_id"), "actor_pid": facts.get("pid")}
        self.log.info("capsem: kernel %s placed on Ray node %s", self.kernel_id, node)
        key = km.session.key
        start = {
            "op": "start", "kernel_id": self.kernel_id,
            "key": (key if isinstance(key, bytes) else key.encode()).hex(),
            "signature_scheme": km.session.signature_scheme,
            "policy": policy, "folder": None if self.node_folder else cwd, "cwd": cwd,
            "env": self._guest_env(env),
            "extra": {"memory_mb": self.memory_mb, "cpus": self.cpus, "share_mode": self.share_mode,
                      "accel": self.accel, "vsock": self.vsock, "observe": bool(self.observe_mode),
                      "use_pool": bool(self.use_pool), "image": self.image,
                      "boot_timeout": int(self.boot_timeout)},
        }
        remote = RemoteKernel(self.kernel_id, self._vm_config(cwd), actor=actor,
                              on_closed=lambda abnormal: _end_actor(actor, facts.get("node_id"), abnormal))
        self.kernel_vm = remote
        # a restart (same KernelManager, fresh provisioner) keeps the ports its clients know
        known = {name: int(getattr(km, key) or 0) for name, key in PORT_KEYS.items()}
        ports = await loop_thread.run(remote.start(prepared, identity, start, timeout=self.boot_timeout + 120,
                                                   ports=known if all(known.values()) else None))
        km.cleanup_connection_file()  # a restart's file names the previous tunnel's ports
        for name, port in ports.items():
            setattr(km, PORT_KEYS[name], port)
        km.write_connection_file(jupyter_session=env.get("JPY_SESSION_NAME", ""))
        self.connection_info = km.get_connection_info()
        return self.connection_info

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        info["ray_node"] = self.placed_node
        return info


def ensure_registered() -> None:
    """Make jupyter_client find this provisioner by name even where the installed package metadata
    predates its entry point (an older editable install): the Sandbox's in-memory kernelspec names
    it, and must not depend on how the package was installed."""
    from importlib.metadata import EntryPoint
    from jupyter_client.provisioning.factory import KernelProvisionerFactory
    factory = KernelProvisionerFactory.instance()
    if PROVISIONER_NAME not in factory.provisioners:
        factory.provisioners[PROVISIONER_NAME] = EntryPoint(
            PROVISIONER_NAME, f"{__name__}:RayCapsemProvisioner", KernelProvisionerFactory.GROUP_NAME)


def _end_actor(actor, node_id: str | None, abnormal: bool) -> None:
    """The kernel's tunnel is closed: end its actor; after an abnormal end (the actor's process
    died, the node went silent) sweep the node, which removes the dead VM's runtime files."""
    from . import placement
    if not abnormal:  # let the actor finish its teardown (VM, private dir, node folder) before it ends
        try:
            _ray_get(actor.stop.remote(), STOP_TIMEOUT)
        except Exception:  # noqa: BLE001 - dead or stuck: killed below, and the node swept
            abnormal = True
    placement.kill(actor)
    if abnormal and node_id:
        placement.sweep_node(node_id)


def _ray_get(ref, timeout: float):
    import ray
    return ray.get(ref, timeout=timeout)


def read_policy(policy: str, folder: str | None) -> str:
    """The policy text the node gets inside TLS: the `policy` trait's file, else the front end
    user's default policy file when there is one, else '' (deny-all on the node: the node user's own
    policy never applies to a front end's kernel). Checked here as
    for a local kernel (not in the shared folder, not writable by others, and it parses), so a bad
    policy fails the start before anything is placed. Credential files it names are read on the
    node, at the same path."""
    from capsem_vm.policy.loader import load_policy
    from capsem_vm.policy.source import check_policy_location, resolve_policy_path
    path = resolve_policy_path(policy or None)
    if path is None:
        return ""
    check_policy_location(path, [folder] if folder else [])
    load_policy(path)
    text = path.read_text()
    if len(text.encode()) > MAX_POLICY:
        raise RuntimeError(f"the policy file {path} is larger than {MAX_POLICY} bytes")
    return text

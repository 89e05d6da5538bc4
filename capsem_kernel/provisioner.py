"""CapsemProvisioner: a jupyter_client kernel provisioner that runs each kernel in its own VM.

A sibling of jupyter_client's LocalProvisioner. Configure it like any Jupyter object, e.g. in
jupyter_server_config.py:

    c.CapsemProvisioner.memory_mb = 2048
    c.CapsemProvisioner.share_mode = "ro"

or per kernelspec in kernel.json's metadata.kernel_provisioner.config (see `capsem kernel install`).

Contract notes:
- launch_kernel boots a fresh VM, shares the kernel's cwd (the notebook's folder) at the same path,
  starts ipykernel in the guest with the key chosen here (sent over the control port only), and
  forwards the five channel ports of the connection info into the guest.
- poll() is None while the VM boots and the kernel runs; an exit code once the guest kernel or the
  VM died. Restarts get a fresh VM: nothing survives.
- Only the kernelspec's own env and JPY_SESSION_NAME reach the guest: the host's environment
  (tokens, credentials) never does.
- Warm pool (`use_pool`, `pool_autostart`; see capsem_vm/pool/): claim a booted VM of this
  kernel's flavour from `capsem pool` and attach the folder, policy and key to it at claim time;
  no pool, no match or a failed claim: cold start, with a warning.
- Egress: the guest reaches the outside only through the policy proxy, with the policy of the
  `policy` trait (kernelspec / Jupyter config), else the user's config dir, else deny-all; flows
  are audited under this kernel's id (`capsem audit --kernel ID`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

from jupyter_client.connect import KernelConnectionInfo, LocalPortCache
from jupyter_client.localinterfaces import is_local_ip
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Bool, CaselessStrEnum, Float, Int, Unicode

from capsem_vm.errors import CapsemError
from capsem_vm.config import DEFAULT_CPUS, DEFAULT_MEMORY_MB, EgressConfig, Share, VMConfig
from capsem_vm import fds, sweep
from capsem_vm.polling import poll_until_async

from . import loop_thread, port_hold
from .channels import PORT_KEYS
from .kernel_vm import KernelVM
from .start_error import KernelStartError

GUEST_ENV_PASSTHROUGH = ("JPY_SESSION_NAME",)
RESTART_GAP_S = 5.0  # how long a kernel cleaned up for a restart counts as restarting, not dead


class CapsemProvisioner(KernelProvisionerBase):
    memory_mb = Int(DEFAULT_MEMORY_MB, config=True, help="Guest memory in MB.")
    cpus = Int(DEFAULT_CPUS, config=True, help="Virtual CPUs of the guest.")
    accel = CaselessStrEnum(["auto", "kvm", "tcg"], "auto", config=True,
                            help="Accelerator: auto picks KVM where it really works, else TCG.")
    vsock = CaselessStrEnum(["auto", "vhost-user", "kernel"], "auto", config=True, help="vsock backend.")
    image = Unicode(None, allow_none=True, config=True, help="VM image directory (default: the built default image).")
    share_mode = CaselessStrEnum(["rw", "ro"], "rw", config=True,
                                 help="How the notebook folder is shared into the guest: rw or ro.")
    policy = Unicode("", config=True,
                     help="Egress policy file (host-side). Empty: the user's config dir policy.toml "
                          "if it exists, else deny everything. Never read from the notebook folder.")
    # why not `observe`: HasTraits.observe is traitlets' own method
    observe_mode = Bool(False, config=True,
                        help="OBSERVE MODE, for trusted code only: requests the policy would refuse go out and are "
                             "audited as would-deny (built-in protections still refuse; no credential is "
                             "injected into them). Same as `observe = true` in the policy's [settings].")
    boot_timeout = Float(180.0, config=True, help="Seconds to wait for the guest agent (TCG is slow).")
    use_pool = Bool(False, config=True,
                    help="Claim a warm VM from this user's pool (`capsem pool start`) when one of this "
                         "kernel's flavour (memory, CPUs, image) is ready; else cold start, with a warning.")
    pool_autostart = Bool(False, config=True,
                          help="With use_pool: start the pool service (this kernel's flavour) when none "
                               "answers. This kernel cold-starts; later ones find warm VMs.")
    pool_size = Int(2, config=True, help="Warm VMs the pool keeps when pool_autostart starts it.")

    kernel_vm: KernelVM | None = None
    ports_cached = False
    _held: dict | None = None  # the channel ports, listening from pre_launch on (port_hold.py)
    _restart_until = 0.0  # monotonic deadline: cleaned up for a restart, the relaunch is on its way
    _pool_starter: asyncio.Task | None = None  # reaps `capsem pool start` (kept: tasks are held weakly)

    # --- launch ------------------------------------------------------------------------------

    @property
    def has_process(self) -> bool:
        return self.kernel_vm is not None or self._restarting()

    def _restarting(self) -> bool:
        """Between cleanup(restart=True) and the relaunch (jupyter_client then replaces this
        instance), the kernel is restarting, not dead: a poll in that gap must not report an exit
        code (a front end would show 'dead', a watcher restart it again). Bounded, so a relaunch
        that never comes does not keep a dead kernel alive."""
        return self.kernel_vm is None and time.monotonic() < self._restart_until

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        sweep.sweep_once()  # what a killed capsem left in the runtime dir (once per process)
        fds.raise_limit()  # ~60 descriptors per kernel in this process (capsem_vm/fds.py)
        km = self.parent
        if km.transport != "tcp" or not is_local_ip(km.ip):
            raise RuntimeError(f"capsem kernels listen on a local TCP address; got {km.transport}://{km.ip}")
        if km.cache_ports and not self.ports_cached:
            lpc = LocalPortCache.instance()
            for name in ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port"):
                setattr(km, name, lpc.find_available_port(km.ip))
            self.ports_cached = True
        kwargs.pop("extra_arguments", None)
        env = kwargs.get("env") or {}
        km.write_connection_file(jupyter_session=env.get("JPY_SESSION_NAME", ""))
        self.connection_info = km.get_connection_info()
        self._listeners()  # ours from now on, through the boot (port_hold.py says why)
        return await super().pre_launch(cmd=list(self.kernel_spec.argv), **kwargs)

    def _vm_config(self, cwd: str) -> VMConfig:
        share = Share(Path(cwd).resolve(), "notebook", readonly=self.share_mode == "ro")
        egress = EgressConfig(policy=self.policy or None, kernel_id=self.kernel_id, observe=self.observe_mode)
        # capsem.prewarm=preinit: the agent imports ipykernel and initialises its app as soon as it
        # runs, in parallel with egress setup and the mount (kernel_start then hands over the key)
        return VMConfig(memory_mb=self.memory_mb, cpus=self.cpus, accel=self.accel, image=self.image,
                        shares=(share,), boot_timeout=self.boot_timeout, egress=egress,
                        kernel_args=("capsem.prewarm=preinit",))

    def _listeners(self) -> dict:
        """The held channel ports; held again if a failed start (a claimed VM) closed them."""
        if not port_hold.usable(self._held):
            port_hold.release(self._held)
            ports = {name: int(self.connection_info[key]) for name, key in PORT_KEYS.items()}
            self._held = port_hold.hold(str(self.connection_info["ip"]), ports)
        return self._held

    def _release_ports(self) -> None:
        port_hold.release(self._held)
        self._held = None

    def _guest_env(self, env: dict[str, str]) -> dict[str, str]:
        guest = {k: str(v) for k, v in (self.kernel_spec.env or {}).items()}
        guest.update({k: env[k] for k in GUEST_ENV_PASSTHROUGH if k in env})
        return guest

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        try:
            return await self._launch(**kwargs)
        except BaseException as exc:
            self._release_ports()  # nobody calls cleanup() after a failed launch (jupyter_client does not)
            if isinstance(exc, CapsemError):  # with its reason for Jupyter server clients, not "Unhandled error"
                raise KernelStartError.from_capsem(exc) from exc
            raise

    async def _launch(self, **kwargs: Any) -> KernelConnectionInfo:
        cwd = kwargs.get("cwd") or os.getcwd()
        env = kwargs.get("env") or {}
        config = self._vm_config(cwd)
        progress = lambda m: self.log.info("capsem: %s", m)  # noqa: E731
        claimed = await loop_thread.run(self._claim_pooled(config)) if self.use_pool else None
        if claimed is not None:
            kernel_vm = KernelVM(config, vm=claimed)
            self.kernel_vm = kernel_vm
            self.log.info("capsem: starting a kernel in a warm pooled VM for %s", cwd)
            try:
                await loop_thread.run(kernel_vm.start(self.connection_info, str(config.shares[0].host_path),
                                                      self._guest_env(env), self._listeners()))
                return self.connection_info
            except Exception as exc:  # noqa: BLE001 - the pooled VM is gone (stop()); boot a cold one
                self.log.warning("capsem: the claimed warm VM failed (%s); cold start", exc)
        kernel_vm = KernelVM(config, vsock=self.vsock, progress=progress)
        self.kernel_vm = kernel_vm
        self.log.info("capsem: starting a kernel VM for %s", cwd)
        await loop_thread.run(kernel_vm.start(self.connection_info, str(config.shares[0].host_path),
                                              self._guest_env(env), self._listeners()))
        return self.connection_info

    async def _claim_pooled(self, config: VMConfig):
        """A ClaimedVM of this kernel's flavour from the user's pool, or None (with a warning)."""
        claimed, unavailable = await claim_pooled(config, self.vsock, self.log)
        if unavailable and self.pool_autostart:
            await self._start_pool()
        return claimed

    async def _start_pool(self) -> None:
        import sys
        from capsem_vm.pool.config import PoolConfig
        pool = PoolConfig(size=self.pool_size, memory_mb=self.memory_mb, cpus=self.cpus, accel=self.accel,
                          image=self.image or None)
        argv = [sys.executable, "-m", "capsem_vm.cli", "pool", "start", *pool.to_argv()]
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.DEVNULL)
        self.log.info("capsem: starting the warm VM pool (pid %d) for later kernels", proc.pid)
        # reaped; `capsem pool start` daemonizes. The task is kept: asyncio holds tasks weakly.
        self._pool_starter = asyncio.get_running_loop().create_task(proc.wait())

    # --- lifecycle ---------------------------------------------------------------------------

    async def poll(self) -> int | None:
        if self.kernel_vm is None:
            return None if self._restarting() else 0
        return self.kernel_vm.poll()

    async def wait(self) -> int | None:
        if self.kernel_vm is None:
            return 0
        vm = self.kernel_vm
        await poll_until_async(lambda: vm.poll() is not None, what="the kernel to exit", timeout=None, interval=0.1)
        return vm.poll()

    async def send_signal(self, signum: int) -> None:
        if self.kernel_vm is None:
            return
        if signum == signal.SIGKILL:
            await self.kill()
            return
        await loop_thread.run(self.kernel_vm.send_signal(signum))

    async def kill(self, restart: bool = False) -> None:
        if self.kernel_vm is not None:
            await loop_thread.run(self.kernel_vm.stop(grace=0.5))

    async def terminate(self, restart: bool = False) -> None:
        if self.kernel_vm is not None:
            await loop_thread.run(self.kernel_vm.stop())

    async def cleanup(self, restart: bool = False) -> None:
        if self.kernel_vm is not None:
            await loop_thread.run(self.kernel_vm.stop(grace=0.5))
            self.kernel_vm = None
            if restart:
                self._restart_until = time.monotonic() + RESTART_GAP_S
        self._release_ports()
        if self.ports_cached and not restart:
            lpc = LocalPortCache.instance()
            for key in ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port"):
                lpc.return_port(self.connection_info[key])
            self.ports_cached = False

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        return max(recommended, 15.0)  # a TCG guest shuts ipykernel down slowly

    def get_stable_start_time(self, recommended: float = 10.0) -> float:
        return max(recommended, 60.0)

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        info["ports_cached"] = self.ports_cached
        if self.kernel_vm is not None:
            info["capsem"] = self.kernel_vm.info()
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        # A VM dies with the process that started it, so there is nothing to re-attach to.
        await super().load_provisioner_info(provisioner_info)
        self.ports_cached = provisioner_info.get("ports_cached", False)


async def claim_pooled(config: VMConfig, vsock: str, log) -> tuple[Any, bool]:
    """(a ClaimedVM of `config`'s flavour from this user's pool or None, whether no pool answered).
    Each None comes with a warning on `log`. Shared by the provisioner and the Ray node actor."""
    from capsem_vm.image.store import resolve_image
    from capsem_vm.image.verify import read_manifest
    from capsem_vm.pool import client, wire
    from capsem_vm.pool.claimed import ClaimedVM
    if vsock == "kernel":
        log.warning("capsem: pooled VMs use the vhost-user vsock backend, this kernel asks for "
                    "'kernel': cold start")
        return None, False
    try:
        digest = read_manifest(resolve_image(config.image))[1]
        flavour = wire.Flavour(config.memory_mb, config.cpus, digest, config.accel)
        claim, why = await client.claim(flavour)
    except client.PoolUnavailable as exc:
        log.warning("capsem: no warm VM pool (%s): cold start", exc.message)
        return None, True
    except (CapsemError, OSError, wire.WireError) as exc:
        log.warning("capsem: claiming a warm VM failed (%s): cold start", exc)
        return None, False
    if claim is None:
        log.warning("capsem: the pool has no warm VM for this kernel (%s): cold start", why)
        return None, False
    return ClaimedVM(config, claim, progress=lambda m: log.info("capsem: %s", m)), False

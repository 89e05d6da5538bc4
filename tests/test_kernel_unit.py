"""No VM: the capsem kernelspec as `capsem kernel install` writes it, and how the provisioner's
settings resolve (Jupyter config, overridden by a kernelspec's own provisioner config)."""

import json
import subprocess
import sys

import pytest
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.provisioning import KernelProvisionerFactory
from traitlets.config import Config

from capsem_kernel.provisioner import CapsemProvisioner

CLI = [sys.executable, "-m", "capsem_vm.cli", "kernel", "install"]


def install(prefix, *args) -> dict:
    proc = subprocess.run(CLI + ["--prefix", str(prefix)] + list(args), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def spec_manager(prefix) -> KernelSpecManager:
    return KernelSpecManager(kernel_dirs=[str(prefix / "share" / "jupyter" / "kernels")])


def provisioner(prefix, name, config=None) -> CapsemProvisioner:
    ksm = spec_manager(prefix)
    km = KernelManager(kernel_name=name, kernel_spec_manager=ksm, config=config or Config())
    return KernelProvisionerFactory.instance(parent=km.parent).create_provisioner_instance(
        "kernel-id", km.kernel_spec, parent=km)


def test_installed_kernelspec(tmp_path):
    install(tmp_path)
    spec_dir = tmp_path / "share" / "jupyter" / "kernels" / "capsem"
    data = json.loads((spec_dir / "kernel.json").read_text())
    assert data["language"] == "python" and data["interrupt_mode"] == "message"
    assert data["metadata"]["kernel_provisioner"] == {"provisioner_name": "capsem-provisioner", "config": {}}
    assert "{connection_file}" in data["argv"]
    for size in (32, 64):
        assert (spec_dir / f"logo-{size}x{size}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # jupyter finds it through JUPYTER_PATH, like the tests and the benchmark use it
    listed = subprocess.run([sys.executable, "-m", "jupyter_client.kernelspecapp", "list", "--json"],
                            capture_output=True, text=True, env={"JUPYTER_PATH": str(tmp_path / "share" / "jupyter"),
                                                                 "PATH": "/usr/bin:/bin"})
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["kernelspecs"]["capsem"]["resource_dir"] == str(spec_dir)


def test_install_writes_only_the_options_given(tmp_path):
    install(tmp_path, "--name", "big", "--memory", "2048", "--share-mode", "ro", "--display-name", "Big")
    data = json.loads((tmp_path / "share" / "jupyter" / "kernels" / "big" / "kernel.json").read_text())
    assert data["display_name"] == "Big"
    assert data["metadata"]["kernel_provisioner"]["config"] == {"memory_mb": 2048, "share_mode": "ro"}


@pytest.mark.parametrize("args", [["--memory", "100"], ["--cpus", "0"], ["--policy", "/nonexistent/p.toml"]])
def test_install_rejects_bad_options(tmp_path, args):
    proc = subprocess.run(CLI + ["--prefix", str(tmp_path)] + args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert not (tmp_path / "share").exists()


def test_provisioner_settings_from_jupyter_config_and_kernelspec(tmp_path):
    install(tmp_path)
    install(tmp_path, "--name", "capsem-ro", "--share-mode", "ro", "--memory", "512")
    defaults = provisioner(tmp_path, "capsem")
    assert isinstance(defaults, CapsemProvisioner)
    assert (defaults.share_mode, defaults.memory_mb, defaults.cpus, defaults.accel) == ("rw", 1024, 2, "auto")
    config = Config({"CapsemProvisioner": {"share_mode": "ro", "memory_mb": 1536, "cpus": 1}})
    # Jupyter config applies to a kernelspec that leaves the setting open...
    prov = provisioner(tmp_path, "capsem", config)
    assert (prov.share_mode, prov.memory_mb, prov.cpus) == ("ro", 1536, 1)
    # ...and a kernelspec's own provisioner config wins where it sets something.
    prov = provisioner(tmp_path, "capsem-ro", Config({"CapsemProvisioner": {"share_mode": "rw", "cpus": 1}}))
    assert (prov.share_mode, prov.memory_mb, prov.cpus) == ("ro", 512, 1)
    # The VM config follows the provisioner's settings (the share is the kernel's cwd, same path).
    vm_config = prov._vm_config(str(tmp_path))
    assert (vm_config.memory_mb, vm_config.cpus) == (512, 1)
    assert [(str(s.host_path), s.guest_path, s.readonly) for s in vm_config.shares] == \
        [(str(tmp_path), str(tmp_path), True)]


async def test_a_kernel_cleaned_up_for_a_restart_is_restarting_not_dead(tmp_path, monkeypatch):
    """Between cleanup(restart=True) and the relaunch (jupyter_client makes a new provisioner in
    between), poll() says running, not an exit code; for a bounded time only, and never after a
    cleanup that is not a restart."""
    import capsem_kernel.provisioner as prov
    install(tmp_path)
    p = provisioner(tmp_path, "capsem")
    assert await p.poll() == 0 and not p.has_process  # never launched
    await p.cleanup(restart=False)
    assert await p.poll() == 0 and not p.has_process

    class Stopped:  # what cleanup() stops: a kernel VM that is gone
        async def stop(self, grace):
            pass
    p.kernel_vm = Stopped()
    await p.cleanup(restart=True)
    assert p.kernel_vm is None and await p.poll() is None and p.has_process
    p._restart_until = prov.time.monotonic() - 0.01  # the relaunch never came: dead after the gap
    assert await p.poll() == 0 and not p.has_process

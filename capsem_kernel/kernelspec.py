"""Write the "capsem" kernelspec: a Python kernel whose provisioner is CapsemProvisioner."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager

from .logo import png

PROVISIONER_NAME = "capsem-provisioner"
RAY_PROVISIONER_NAME = "capsem-ray-provisioner"  # capsem_kernel/ray/provisioner.py (extra [ray])
DEFAULT_NAME = "capsem"
DEFAULT_DISPLAY_NAME = "Python 3 (Capsem sandbox)"


def kernel_json(display_name: str, provisioner_config: dict, provisioner_name: str = PROVISIONER_NAME) -> dict:
    return {
        # argv is what a local launch would run; the provisioner starts the equivalent in the guest.
        "argv": ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": "message",
        "metadata": {
            "debugger": False,
            "kernel_provisioner": {"provisioner_name": provisioner_name, "config": provisioner_config},
        },
    }


def install(name: str = DEFAULT_NAME, display_name: str = DEFAULT_DISPLAY_NAME, *, user: bool = False,
            prefix: str | None = None, provisioner_config: dict | None = None,
            provisioner_name: str = PROVISIONER_NAME) -> str:
    """Install the kernelspec; returns its directory."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / name
        src.mkdir()
        (src / "kernel.json").write_text(json.dumps(kernel_json(display_name, provisioner_config or {},
                                                                  provisioner_name), indent=1))
        (src / "logo-32x32.png").write_bytes(png(32))
        (src / "logo-64x64.png").write_bytes(png(64))
        return KernelSpecManager().install_kernel_spec(str(src), kernel_name=name, user=user, prefix=prefix)


def sys_prefix() -> str:
    return sys.prefix

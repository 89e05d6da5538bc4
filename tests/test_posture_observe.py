"""`capsem doctor --security` says, in warning words, where observe mode is on."""

from __future__ import annotations

import os
import subprocess
import sys

from capsem_vm import posture

OBSERVE = "[settings]\nobserve = true\n"


def _spec(policy: str | None, provisioner: str = "capsem-provisioner", **extra) -> dict:
    config = ({"policy": policy} if policy else {}) | extra
    return {"spec": {"metadata": {"kernel_provisioner": {"provisioner_name": provisioner, "config": config}}}}


def test_observe_in_the_user_policy_or_a_kernelspec_policy_is_weak(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSEM_CONFIG_DIR", str(tmp_path / "config"))
    (tmp_path / "config").mkdir()
    strict, observing = tmp_path / "strict.toml", tmp_path / "lab.toml"
    strict.write_text("")
    observing.write_text(OBSERVE)
    specs = {"capsem": _spec(str(strict)), "plain": _spec(None), "other": _spec(str(observing), "local-provisioner")}
    assert posture.check_observe(specs)[0] == posture.OK
    status, detail = posture.check_observe({**specs, "capsem-lab": _spec(str(observing))})
    assert status == posture.WEAK and "OBSERVE MODE" in detail and "kernelspec 'capsem-lab'" in detail
    assert str(observing) in detail and "would-deny" in detail
    status, detail = posture.check_observe({**specs, "lab2": _spec(None, observe_mode=True)})
    assert status == posture.WEAK and "kernelspec 'lab2' (installed with --observe)" in detail
    (tmp_path / "config" / "policy.toml").write_text(OBSERVE)
    status, detail = posture.check_observe(specs)
    assert status == posture.WEAK and "the user policy" in detail and "capsem-lab" not in detail
    # a kernelspec whose policy cannot be read is not a known posture
    (tmp_path / "config" / "policy.toml").unlink()
    status, detail = posture.check_observe({"gone": _spec(str(tmp_path / "missing.toml"))})
    assert status == posture.WEAK and "'gone'" in detail


def test_doctor_security_shows_an_installed_observe_kernelspec(tmp_path):
    observing = tmp_path / "lab.toml"
    observing.write_text(OBSERVE)
    env = {"JUPYTER_PATH": str(tmp_path / "share" / "jupyter"), "CAPSEM_CONFIG_DIR": str(tmp_path / "config"),
           "JUPYTER_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    env = {**os.environ, **env}
    out = subprocess.run([sys.executable, "-m", "capsem_vm.cli", "kernel", "install", "--prefix", str(tmp_path),
                          "--name", "capsem-lab", "--policy", str(observing)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    code = ("from capsem_vm import posture; s, d = posture.check_observe(); print(s); print(d)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    status, detail = out.stdout.splitlines()[:2]
    assert status == "weak" and "capsem-lab" in detail and "OBSERVE MODE" in detail, out.stdout + out.stderr

"""`capsem doctor --security`: prints this host's posture, exits non-zero on a weak setting."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from capsem_vm import posture

CAPSEM = [sys.executable, "-m", "capsem_vm.cli"]


def test_doctor_security_prints_every_check_and_exit_code_follows_weak_lines():
    proc = subprocess.run(CAPSEM + ["doctor", "--security"], capture_output=True, text=True, timeout=300)
    lines = proc.stdout.splitlines()
    names = [line.split()[1:2] for line in lines[:-1]]
    for name, _ in posture.CHECKS:
        assert any(line.split(None, 1)[1].startswith(name) for line in lines[:-1]), (name, proc.stdout)
    weak = [line for line in lines if line.strip().startswith("WEAK")]
    assert proc.returncode == (1 if weak else 0), proc.stdout + proc.stderr
    assert lines[-1].startswith("security posture:")
    assert names
    seccomp = next(line for line in lines if " seccomp " in line)
    assert seccomp.strip().startswith("OK"), seccomp  # QEMU here has -sandbox and the kernel filters


def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPSEM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CAPSEM_CONFIG_DIR", str(tmp_path / "config"))
    (tmp_path / "config").mkdir()


def test_ca_key_readable_by_others_is_weak(tmp_path, monkeypatch):
    _env(monkeypatch, tmp_path)
    assert posture.check_ca_key()[0] == posture.OK  # not created yet
    from capsem_vm.proxy.ca import ensure_ca
    paths = ensure_ca()
    assert posture.check_ca_key()[0] == posture.OK
    os.chmod(paths.key_and_cert, 0o644)
    status, detail = posture.check_ca_key()
    assert status == posture.WEAK and "0644" in detail


@pytest.mark.parametrize("rules, status", [
    ("", posture.OK),
    ('[[rule]]\nname = "pypi"\nhost = "pypi.org"\naction = "allow"\n', posture.OK),
    ('[[rule]]\nname = "everything"\nhost = "*"\naction = "allow"\n', posture.WEAK),
    ('[[rule]]\nname = "lan"\nhost = "10.0.0.0/8"\naction = "allow"\n', posture.WEAK),
    ('[[rule]]\nname = "local"\nhost = "127.0.0.1"\nport = 8888\naction = "allow"\n', posture.WEAK),
])
def test_default_policy_breadth(tmp_path, monkeypatch, rules, status):
    _env(monkeypatch, tmp_path)
    if rules:
        (tmp_path / "config" / "policy.toml").write_text(rules)
    assert posture.check_policy()[0] == status


def test_report_exit_code():
    out = []
    assert posture.report([("a", lambda: (posture.OK, "fine")), ("b", lambda: (posture.INFO, "fyi"))], out.append) == 0
    assert posture.report([("a", lambda: (posture.OK, "fine")), ("b", lambda: (posture.WEAK, "bad"))], out.append) == 1
    assert posture.report([("c", lambda: 1 / 0)], out.append) == 1  # an unknown posture is weak
    assert any(line.strip().startswith("WEAK  c") for line in out)


def test_a_kernel_without_seccomp_user_notification_is_weak(tmp_path):
    actions = tmp_path / "actions_avail"
    actions.write_text("kill_process kill_thread trap errno trace log allow\n")
    status, detail = posture.check_seccomp(str(actions))
    assert status == posture.WEAK and "user notification" in detail


def test_a_credential_file_others_can_write_is_weak(tmp_path, monkeypatch):
    _env(monkeypatch, tmp_path)
    secret = tmp_path / "config" / "token"
    secret.write_text("tok")
    secret.chmod(0o666)
    (tmp_path / "config" / "policy.toml").write_text(
        f'[[credential]]\nname = "svc"\nhosts = ["api.example"]\nfile = "{secret}"\nheader = "Authorization"\n')
    status, detail = posture.check_policy()
    assert status == posture.WEAK and f"file {secret} is writable by other users" in detail
    secret.chmod(0o600)
    assert posture.check_policy()[0] == posture.OK

"""capsem_vm.egress on the host, no VM: where the policy comes from, when the proxy service runs
(and stops), what a deny-all VM's bridge answers, and the CLI refusing a policy the guest could
write. The guest end is the guest-protocol client of the proxy tests, on a fake vsock transport
(Unix sockets, one per port)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from proxy_helpers import FakeTransport, Guest, wait_for

import capsem_vm.egress as host_egress
from capsem_vm.config import EgressConfig
from capsem_vm.egress_runtime import EgressRuntime, process_runtime, set_process_runtime
from capsem_vm.policy import PolicyError
from capsem_vm.proxy import ca_cert_pem, dns, read_events

from host_helpers import CAPSEM


@pytest.fixture
async def dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSEM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CAPSEM_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("CAPSEM_RUNTIME_DIR", str(tmp_path / "rt"))
    # the test's own egress runtime (audit log in this data dir), used by every Egress made
    # without one; closed at the end with any proxy service it started
    runtime = EgressRuntime()
    before = set_process_runtime(runtime)
    yield tmp_path
    set_process_runtime(before)
    await runtime.close()


async def test_default_policy_is_deny_all_and_needs_no_proxy(dirs):
    t = FakeTransport(dirs)
    eg = host_egress.Egress(EgressConfig())
    await eg.start(t)
    try:
        assert eg.policy.source.startswith("<default") and not eg.needs_proxy
        assert eg.kernel_id.startswith("vm-") and process_runtime().service is None
        g = Guest(t.path(5002), t.path(5003), "")
        assert (await asyncio.to_thread(g.dns, "example.com"))[0] == dns.NXDOMAIN
        s, reply = await asyncio.to_thread(g.open, "example.com", 443)
        s.close()
        assert reply == {"t": "refused", "reason": "no rule allows this (default deny)", "rule": "default",
                         "code": "default-deny"}
        s, reply = await asyncio.to_thread(g.open, "169.254.169.254", 80)
        s.close()
        assert reply["t"] == "refused"

        def audited():
            eg.audit.flush()
            return [r for r in read_events(dirs / "data" / "audit.sqlite3", kernel=eg.kernel_id)]
        got = await asyncio.to_thread(wait_for, audited, 10)
        assert {(r["kind"], r["host"], r["decision"]) for r in got} >= {
            ("dns", "example.com", "deny"), ("connect", "example.com", "deny"), ("connect", "169.254.169.254", "deny")}
        assert eg.info()["proxy"] is False
    finally:
        await eg.close()
        await t.close()
    assert process_runtime().service is None


async def test_user_config_policy_starts_the_shared_service_and_idles_it_out(dirs, monkeypatch):
    (dirs / "config").mkdir()
    user_policy = dirs / "config" / "policy.toml"
    user_policy.write_text('[[rule]]\nname = "pypi"\nhost = "pypi.org"\naction = "allow"\n')
    os.chmod(user_policy, 0o644)
    runtime = EgressRuntime(idle=0.5)  # owned here: Egress is handed it
    t = FakeTransport(dirs)
    eg = host_egress.Egress(EgressConfig(kernel_id="k-user"), runtime=runtime)
    await eg.start(t)
    try:
        assert eg.policy.source == str(user_policy) and eg.needs_proxy
        bridge = await eg._bridge()
        assert bridge.proxy.username == "k-user"
        assert runtime.service is not None and runtime.service.alive
        pids = runtime.service.pids
        assert pids and all(Path(f"/proc/{p}").exists() for p in pids)
        # a denied name never reaches the proxy; an allowed one is handed to it
        g = Guest(t.path(5002), t.path(5003), "")
        rcode, ips = await asyncio.to_thread(g.dns, "pypi.org")
        assert rcode == dns.NOERROR and ips[0].startswith("198.18.")
    finally:
        await eg.close()
        await t.close()
    # the last VM is gone: the service stops after the runtime's idle time
    await asyncio.sleep(1.5)
    for _ in range(50):
        if runtime.service is None:
            break
        await asyncio.sleep(0.2)
    assert runtime.service is None
    # service is None as soon as the stop begins; the workers exit during it (a stop frame, then
    # at most 10 s before a SIGKILL)
    def gone(p) -> bool:
        try:
            return "Z" in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
    for _ in range(60):
        if all(gone(p) for p in pids):
            break
        await asyncio.sleep(0.2)
    assert all(gone(p) for p in pids)
    await runtime.close()


async def test_policy_in_a_guest_writable_folder_is_refused(dirs):
    share = dirs / "notebook"
    share.mkdir()
    (share / "policy.toml").write_text('[[rule]]\nname = "all"\nhost = "*"\naction = "allow"\n')
    eg = host_egress.Egress(EgressConfig(policy=str(share / "policy.toml")), [str(share)])
    with pytest.raises(PolicyError, match="folder the VM can write"):
        await eg.start(FakeTransport(dirs))


def _credential_policy(dirs, secret_file) -> Path:
    p = dirs / "cred-policy.toml"
    p.write_text(f'[[rule]]\nname = "api"\nhost = "api.example"\naction = "allow"\n\n[[credential]]\n'
                 f'name = "svc"\nhosts = ["api.example"]\nfile = "{secret_file}"\nheader = "Authorization"\n')
    p.chmod(0o600)
    return p


async def test_a_credential_file_in_any_share_stops_the_vm_before_it_boots(dirs):
    """Egress.start is where cold VMs (vm.py) and pooled claims (pool/claimed.py) load the policy with
    the kernel's shares; a credential file the guest could read or write stops it there."""
    share = dirs / "notebook"
    (share / "sub").mkdir(parents=True)
    secret = share / "sub" / "token"
    secret.write_text("tok")
    secret.chmod(0o600)
    eg = host_egress.Egress(EgressConfig(policy=str(_credential_policy(dirs, secret))), [str(share)])
    with pytest.raises(PolicyError, match=f"credential 'svc'.*file {secret} is inside .*shared with the VM"):
        await eg.start(FakeTransport(dirs))
    # a read-only share counts too (the guest could read it): VMs pass every share, whatever its mode
    outside = dirs / "private"
    outside.mkdir(mode=0o700)
    ok = outside / "token"
    ok.write_text("tok")
    ok.chmod(0o644)
    eg = host_egress.Egress(EgressConfig(policy=str(_credential_policy(dirs, ok))), [str(share)])
    await eg.start(FakeTransport(dirs))
    await eg.close()
    ok.chmod(0o664)
    eg = host_egress.Egress(EgressConfig(policy=str(_credential_policy(dirs, ok))), [str(share)])
    with pytest.raises(PolicyError, match="writable by other users"):
        await eg.start(FakeTransport(dirs))


@pytest.mark.vm  # needs the image: the refusal comes from `capsem vm run`, after it finds one
def test_vm_run_refuses_a_credential_file_in_the_shared_folder(image_dir, dirs):
    share = dirs / "nb"
    share.mkdir()
    (share / "token").write_text("tok")
    (share / "token").chmod(0o600)
    policy = _credential_policy(dirs, share / "token")
    proc = subprocess.run(CAPSEM + ["vm", "run", "--share", str(share), "--read-only", "--policy", str(policy), "--", "true"],
                          capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert proc.returncode != 0
    assert f"file {share / 'token'} is inside" in proc.stderr and "shared with the VM" in proc.stderr, proc.stderr


async def test_malformed_policy_names_the_line(dirs):
    bad = dirs / "bad.toml"
    bad.write_text('[[rule]]\nname = "x"\nhost = "a.example"\naction = "allow"\nport = "eighty"\n')
    os.chmod(bad, 0o644)
    with pytest.raises(PolicyError) as exc:
        await host_egress.Egress(EgressConfig(policy=str(bad))).start(FakeTransport(dirs))
    assert exc.value.line == 5 and f"{bad}:5:" in str(exc.value)


def test_ca_certificate_sent_to_the_guest_has_no_key(dirs):
    pem = ca_cert_pem().decode()
    assert pem.startswith("-----BEGIN CERTIFICATE-----") and "PRIVATE" not in pem


@pytest.mark.vm  # needs the image: the refusal comes from `capsem vm run`, after it finds one
def test_vm_run_refuses_a_policy_in_the_shared_folder(image_dir, dirs):
    share = dirs / "nb"
    share.mkdir()
    (share / "p.toml").write_text('[[rule]]\nname = "all"\nhost = "*"\naction = "allow"\n')
    env = dict(os.environ)
    proc = subprocess.run(CAPSEM + ["vm", "run", "--share", str(share), "--policy", str(share / "p.toml"),
                                    "--", "true"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert "folder the VM can write" in proc.stderr, proc.stderr

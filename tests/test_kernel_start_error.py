"""A capsem kernel start that capsem refuses (invalid or missing policy, missing image) reaches a
Jupyter server client with its reason: jupyter_server answered any non-HTTPError with a bare 500
"Unhandled error" and an empty traceback, so JupyterLab's "Error Starting Kernel" dialog said
nothing. Each case fails before a VM boots (a real jupyter_server)."""

import json
import os
import urllib.error

import pytest

from capsem_kernel.kernelspec import kernel_json
from capsem_kernel.start_error import REASON, KernelStartError
from capsem_vm.errors import CapsemError
from capsem_vm.policy.loader import PolicyError
from test_kernel_server import Server

pytestmark = pytest.mark.timeout(180)


def test_start_error_is_a_capsem_error_and_an_http_error_with_the_whole_message():
    from tornado.web import HTTPError
    err = KernelStartError.from_capsem(PolicyError("missing required key 'name' (100% sure)", source="/p.toml", line=3))
    assert isinstance(err, CapsemError) and isinstance(err, HTTPError)
    assert str(err) == "/p.toml:3: missing required key 'name' (100% sure)\n  hint: " + err.hint
    assert err.get_message() == err.log_message == str(err)  # no %-formatting or %-escaping
    assert err.status_code == 500 and err.reason == REASON


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("start-error")
    kernels = root / "share" / "kernels"
    bad_policy = root / "bad.toml"
    bad_policy.write_text("[[rule]]\nhost = 5  # 100%\n")
    cases = {
        "capsem-badpolicy": {"policy": str(bad_policy)},
        "capsem-nopolicy": {"policy": str(root / "no-such-policy.toml")},
        "capsem-noimage": {"image": str(root / "no-such-image")},
    }
    for name, config in cases.items():  # what `capsem kernel install` writes, with this config
        spec = kernel_json(name, config)
        assert spec["metadata"]["kernel_provisioner"]["config"] == config
        (kernels / name).mkdir(parents=True)
        (kernels / name / "kernel.json").write_text(json.dumps(spec))
    nb = root / "nb"
    nb.mkdir()
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(root / "share")
    try:
        with open(root / "server.log", "w") as log:
            srv = Server(nb, log)
    finally:
        if old is None:
            os.environ.pop("JUPYTER_PATH")
        else:
            os.environ["JUPYTER_PATH"] = old
    yield srv
    srv.stop()


# the policy is loaded after the image is found: those cases need the image (the VM tier; the unit
# tier runs with an empty image cache), though they too fail before a VM boots
@pytest.mark.parametrize("name, words", [
    pytest.param("capsem-badpolicy", ["bad.toml:1", "missing required key 'name'", "hint:"], marks=pytest.mark.vm),
    pytest.param("capsem-nopolicy", ["no-such-policy.toml"], marks=pytest.mark.vm),
    ("capsem-noimage", ["no-such-image"]),
])
def test_refused_start_says_why_over_rest(server, name, words):
    with pytest.raises(urllib.error.HTTPError) as info:
        server.api("POST", "/api/kernels", {"name": name}, timeout=120)
    assert info.value.code == 500
    assert info.value.reason == REASON
    reply = json.loads(info.value.read())
    assert reply["message"] != "Unhandled error"
    for word in words:
        assert word in reply["message"], reply
    status, kernels = server.api("GET", "/api/kernels")
    assert kernels == []  # nothing half-started is left listed


def test_a_refused_start_frees_the_kernels_ports(tmp_path, monkeypatch):
    """The provisioner listens on the kernel's five ports from pre_launch on (port_hold.py); a start
    that fails must free them, since nobody calls cleanup() after a failed launch."""
    import socket
    from jupyter_client.manager import KernelManager
    spec_dir = tmp_path / "share" / "kernels" / "capsem-noimage"
    spec_dir.mkdir(parents=True)
    spec_dir.joinpath("kernel.json").write_text(json.dumps(kernel_json("x", {"image": str(tmp_path / "none")})))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share"))
    km = KernelManager(kernel_name="capsem-noimage")
    with pytest.raises(KernelStartError, match="none"):
        km.start_kernel(cwd=str(tmp_path))
    ports = [km.shell_port, km.iopub_port, km.stdin_port, km.hb_port, km.control_port]
    assert all(ports)
    for port in ports:  # each can be bound again: nothing of ours listens on it
        with socket.socket() as s:
            s.bind((km.ip, port))

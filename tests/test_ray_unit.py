"""Pure parts of capsem_kernel/ray/ (no Ray cluster, no VM): the node's check of the start message,
the folder placement check, the node's name, the audit rows carried to the front end, and the
kernelspec `capsem kernel install --ray` writes."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess

import pytest
from hypothesis import given, settings, strategies as st

from capsem_kernel.ray import audit_rows
from capsem_kernel.ray.node import StartRefused, check_folder, node_name, parse_start
from capsem_vm.proxy.audit import COLUMNS, read_events

from kernel_helpers import CAPSEM_CLI

KID = "4dd4e818-7f48-4931-9a79-d950363616a0"


def start(**over) -> dict:
    msg = {"op": "start", "kernel_id": KID, "key": b"a-key".hex(), "signature_scheme": "hmac-sha256",
           "policy": "", "folder": "/srv/nb", "cwd": "/srv/nb", "env": {"JPY_SESSION_NAME": "x.ipynb"},
           "extra": {"memory_mb": 1024, "cpus": 1, "share_mode": "ro"}}
    msg.update(over)
    return msg


def test_a_good_start_message():
    got = parse_start(start(), KID)
    assert got["key"] == "a-key" and got["folder"] == "/srv/nb" and got["share_mode"] == "ro"
    assert got["memory_mb"] == 1024 and got["use_pool"] is False and got["accel"] == "auto"


@pytest.mark.parametrize("over, code", [
    ({"kernel_id": "another"}, "wrong_kernel"),
    ({"key": "zz"}, "bad_start"),
    ({"key": "ff"}, "bad_start"),              # not UTF-8
    ({"key": ""}, "bad_start"),
    ({"signature_scheme": "hmac-md5"}, "bad_start"),
    ({"folder": "relative/nb"}, "bad_start"),
    ({"folder": "/srv/\x00nb"}, "bad_start"),
    ({"policy": 7}, "bad_start"),
    ({"env": {"A": 1}}, "bad_start"),
    ({"env": {f"K{i}": "v" for i in range(100)}}, "bad_start"),
    ({"extra": {"memory_mb": True}}, "bad_start"),
    ({"extra": {"memory_mb": 10}}, "bad_start"),
    ({"extra": {"cpus": 0}}, "bad_start"),
    ({"extra": {"share_mode": "rwx"}}, "bad_start"),
    ({"extra": {"accel": "hvf"}}, "bad_start"),
    ({"extra": {"image": "relative/image"}}, "bad_start"),
    ({"extra": []}, "bad_start"),
])
def test_a_bad_start_message_is_refused_with_a_code(over, code):
    with pytest.raises(StartRefused) as err:
        parse_start(start(**over), KID)
    assert err.value.code == code


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
                           max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["kernel_id", "key", "signature_scheme", "policy", "folder", "env", "extra",
                                        "cwd"]), json_values))
def test_parse_start_refuses_or_accepts_never_crashes(fields):
    try:
        parse_start({**start(), **fields}, KID)
    except StartRefused:
        pass


def test_folder_check(tmp_path):
    nb = tmp_path / "nb"
    nb.mkdir()
    marker = ".capsem-placement-" + "0" * 32
    assert check_folder(str(nb), None) == {"ok": True, "reason": ""}
    assert not check_folder(str(nb), marker)["ok"]  # the same path, not the front end's directory
    (nb / marker).touch()
    assert check_folder(str(nb), marker)["ok"]
    assert not check_folder(str(nb), "../../etc/passwd")["ok"]
    assert "cannot see" in check_folder(str(tmp_path / "absent"), None)["reason"]
    (tmp_path / "file").touch()
    assert "not a directory" in check_folder(str(tmp_path / "file"), None)["reason"]
    os.symlink(nb, tmp_path / "link")
    assert not check_folder(str(tmp_path / "link"), None)["ok"]  # a link is not the folder
    assert not check_folder("relative", None)["ok"]


def test_node_name(monkeypatch):
    monkeypatch.delenv("CAPSEM_NODE", raising=False)
    assert node_name({"capsem": 2, "capsem-node-alpha": 1, "CPU": 2}) == "alpha"
    assert node_name({"capsem-node-bad/name": 1}) == os.uname().nodename
    monkeypatch.setenv("CAPSEM_NODE", "beta")
    assert node_name({"capsem-node-alpha": 1}) == "beta"


ROW = {"id": 7, "ts": 1.5, "kernel": "some-other-kernel", "kind": "http", "method": "GET",
       "url": "http://10.0.0.1/x", "host": "10.0.0.1", "port": 80, "status": 403, "decision": "deny",
       "rule": None, "reason": "default deny", "code": "default-deny", "count": 1, "first_ts": 1.5,
       "last_ts": 1.5, "node": "", "bytes_out": 0, "bytes_in": 10, "duration_ms": 2.5}


def test_rows_are_stored_under_the_connections_kernel_tagged_with_the_node(tmp_path):
    db = tmp_path / "audit.sqlite3"
    assert audit_rows.store(db, KID, "alpha", [ROW, {"kind": "http"}, "junk", {**ROW, "ts": "x"}]) == 1
    (row,) = read_events(db)
    assert row["kernel"] == KID and row["node"] == "alpha"  # never the kernel the node named
    assert (row["url"], row["decision"], row["status"], row["code"]) == (ROW["url"], "deny", 403, "default-deny")
    assert audit_rows.store(db, KID, "", [ROW]) == 1 and read_events(db)[-1]["node"] == "?"
    assert audit_rows.store(db, KID, "n\x1b[31m", [ROW]) == 1 and "\x1b" not in read_events(db)[-1]["node"]


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, st.dictionaries(st.sampled_from(COLUMNS + ("id",)), json_values)))
def test_clean_row_is_total(row):
    out = audit_rows.clean_row(row)
    assert out is None or (isinstance(out["ts"], float) and isinstance(out["kind"], str) and out["count"] >= 1)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.fixed_dictionaries({"id": st.integers(0, 10**6), "ts": st.floats(0, 1e10),
                                       "kind": st.sampled_from(["http", "dns"]), "url": st.text(max_size=5000)}),
                max_size=40))
def test_batches_fit_a_control_message(rows):
    from capsem_kernel.remote import wire
    out = audit_rows.batches(rows)
    assert sum(len(b) for b in out) == len(rows)
    for batch in out:
        assert len(wire.encode_message({"op": "audit", "rows": batch})) <= wire.MAX_MESSAGE


def test_kernel_install_ray(tmp_path):
    proc = subprocess.run(CAPSEM_CLI + ["kernel", "install", "--prefix", str(tmp_path), "--name", "capsem-ray",
                                        "--ray", "ray://head:10001", "--memory", "1024"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    spec = json.loads((tmp_path / "share/jupyter/kernels/capsem-ray/kernel.json").read_text())
    prov = spec["metadata"]["kernel_provisioner"]
    assert prov == {"provisioner_name": "capsem-ray-provisioner",
                    "config": {"memory_mb": 1024, "ray_address": "ray://head:10001"}}
    assert spec["interrupt_mode"] == "message"


def test_the_provisioner_is_found_by_name():
    from jupyter_client.provisioning.factory import KernelProvisionerFactory

    from capsem_kernel.ray.provisioner import RayCapsemProvisioner, ensure_registered
    ensure_registered()
    assert KernelProvisionerFactory.instance().provisioners["capsem-ray-provisioner"].load() is RayCapsemProvisioner

"""The addons' shared per-flow state is one typed FlowMeta (capsem_vm/proxy/addons/state.py), reached
through flow_meta(flow); the one refusal path for requests (guard.refuse_request) answers 403 only
when the body is bounded."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import textwrap
from pathlib import Path
from types import SimpleNamespace

from capsem_vm.proxy.addons.state import FLOW_META_KEY, FlowMeta, flow_meta
from capsem_vm.proxy.service import find_proxy_python

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout these tests run from

ADDONS = Path(__file__).resolve().parents[1] / "capsem_vm" / "proxy"


def test_flow_meta_is_created_once_per_flow_with_the_defaults_the_audit_row_expects():
    flow = SimpleNamespace(metadata={"other": 1})
    m = flow_meta(flow)
    assert flow.metadata[FLOW_META_KEY] is m and flow_meta(flow) is m and flow.metadata["other"] == 1
    # what the audit row writes for a flow nobody judged: kind http, no url, no counts, no decision
    assert (m.kind, m.url, m.decision, m.bytes_out, m.bytes_in, m.secrets) == ("http", "", None, None, None, [])
    assert flow_meta(SimpleNamespace(metadata={})).secrets is not m.secrets  # no shared default list


def test_every_field_is_typed_and_documented():
    source = (ADDONS / "addons" / "state.py").read_text()
    block = source[source.index("class FlowMeta"):source.index("FLOW_META_KEY =")]
    for f in dataclasses.fields(FlowMeta):
        assert f.type and f.type != "Any", f.name
        line = next(ln for ln in block.splitlines() if ln.strip().startswith(f"{f.name}:"))
        assert "#" in line, f"FlowMeta.{f.name} has no comment"


def test_no_addon_reads_flow_metadata_except_through_flow_meta():
    for path in ADDONS.rglob("*.py"):
        text = path.read_text()
        hits = re.findall(r"\.metadata\b", text)
        if path.name == "state.py":
            continue
        assert not hits, f"{path.relative_to(ADDONS)} touches flow.metadata directly"


REFUSE = textwrap.dedent('''
    from mitmproxy.test import tflow
    from capsem_vm.policy import DENY, Decision
    from capsem_vm.proxy.addons.guard import DENIED_BODY_MAX, refuse_request
    from capsem_vm.proxy.addons.state import flow_meta

    d = Decision(DENY, "x-rule", "a reason", code="host-mismatch")
    f = tflow.tflow()  # GET, no body
    refuse_request(f, d, "some detail", "denied")
    m = flow_meta(f)
    assert f.response.status_code == 403 and f.live, f.response
    assert b"detail: some detail" in f.response.content and m.decision is d and m.detail == "some detail"
    assert m.killed == ""

    f = tflow.tflow()
    f.request.method = "POST"
    f.request.headers["content-length"] = str(DENIED_BODY_MAX)
    refuse_request(f, d, "", "refused")
    assert f.response.status_code == 403 and flow_meta(f).killed == ""

    for headers in ({"content-length": str(DENIED_BODY_MAX + 1)}, {"transfer-encoding": "gzip, Chunked"},
                    {"content-length": "12x"}):
        f = tflow.tflow()
        f.request.method = "POST"
        del f.request.headers["content-length"]
        f.request.headers.update(headers)
        refuse_request(f, d, "", "refused")
        assert f.response is None and not f.live, headers
        assert flow_meta(f).killed == ("refused request with a large or unbounded body: connection reset "
                                       "instead of a 403"), flow_meta(f).killed
    print("ok")
''')


def test_refusals_answer_403_only_for_bounded_bodies():
    out = subprocess.run([find_proxy_python(), "-c", REFUSE], capture_output=True, text=True, timeout=120,
                         cwd=REPO_ROOT, env={"PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'guest-agent'}",
                                             "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]

""""Allow this host…" from the Sandbox panel, server side (capsem_kernel/server/policy_allow.py and
AllowHandler): the rule is computed from the audit row the server reads, added only through the
checks of `capsem policy suggest --apply` plus the browser edit's own (credentials and settings as
on the host, the file still the one shown). Real audit databases (AuditLog), real policy files,
and a real Jupyter server for the handler's gate. The panel flow with a real kernel in Chromium is
test_lab_e2e.py; the reload into a running kernel's proxy is test_policy_reload.py."""

from __future__ import annotations

import time
import tomllib

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from capsem_kernel.server import network, policy_allow
from capsem_kernel.server.policy_allow import AllowRefused, apply_offer, file_hash, make_offer
from capsem_vm.policy import parse_policy
from capsem_vm.policy.suggest import rule_key, user_rules, valid_host
from capsem_vm.proxy.audit import AuditLog, read_events
from jupyter_helpers import start_server

KID = "0b7f9a52-1111-4222-8333-444455556666"
OTHER = "9c8d7e6f-aaaa-4bbb-8ccc-ddddeeeeffff"
POLICY = '''# the admin's policy
[settings]
observe = true

[[rule]]
name = "pypi"
host = "pypi.org"
scheme = "https"
methods = ["GET"]
action = "allow"

[[credential]]
name = "hf"
hosts = ["huggingface.co"]
env = "HF_TOKEN"
header = "Authorization"
format = "Bearer {value}"
'''


def rows(db, *records) -> list[int]:
    """Write audit rows (kernel, kind, fields) and return their ids, oldest first."""
    log = AuditLog(db)
    before = {r["id"] for r in read_events(db, limit=100000)} if db.exists() else set()
    for kernel, kind, fields in records:
        log.record(kernel, kind, ts=time.time(), **fields)
    log.close()
    return [r["id"] for r in read_events(db, limit=100000) if r["id"] not in before]


@pytest.fixture
def world(tmp_path):
    db = tmp_path / "audit.sqlite3"
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    ids = rows(db,
               (KID, "connect", dict(url="data.example.org:443", host="data.example.org", port=443,
                                     decision="deny", rule="default", code="default-deny")),
               (KID, "http", dict(method="POST", url="https://api.example.com:443/v1/chat", host="api.example.com",
                                  port=443, status=403, decision="would-deny", rule="default", code="default-deny")),
               (KID, "http", dict(method="GET", url="https://dns.google:443/dns-query?dns=x", host="dns.google",
                                  port=443, status=403, decision="deny", rule="doh", code="doh")),
               (KID, "connect", dict(url="10.0.0.5:80", host="10.0.0.5", port=80, decision="deny",
                                     rule="address", code="address")),
               (KID, "http", dict(method="GET", url="https://pypi.org:443/simple/", host="pypi.org", port=443,
                                  status=200, decision="allow", rule="pypi", code="rule-allow")),
               (OTHER, "connect", dict(url="other.example:443", host="other.example", port=443, decision="deny",
                                       rule="default", code="default-deny")))
    return {"db": db, "policy": policy, "connect": ids[0], "would": ids[1], "doh": ids[2], "address": ids[3],
            "allowed": ids[4], "other": ids[5]}


def added(policy_file, old_text: str) -> list:
    new = policy_file.read_text()
    assert new.startswith(old_text)
    before = user_rules(parse_policy(old_text, "p"))
    after = user_rules(parse_policy(new, "p"))
    assert [rule_key(r) for r in after[:len(before)]] == [rule_key(r) for r in before]
    return after[len(before):]


def test_offer_is_the_suggest_rule_for_the_row_and_the_command(world):
    o = make_offer(world["db"], KID, world["connect"], world["policy"])
    assert [(r["host"], r["scheme"], r["port"], r["action"]) for r in o.rules] == \
        [("data.example.org", "https", 443, "allow")]
    out = o.as_json(KID, world["db"], world["db"])
    assert out["base"] == file_hash(POLICY) and out["file"] == str(world["policy"])
    assert out["command"] == f"capsem policy suggest --kernel {KID} --apply {world['policy']}"
    assert "[[rule]]" in out["toml"] and 'host = "data.example.org"' in out["addition"]
    assert out["rules"][0]["summary"] == "allow https://data.example.org:443"
    other_db = o.as_json(KID, world["db"], world["db"].parent / "elsewhere")["command"]
    assert f"--db {world['db']}" in other_db
    # observe mode's would-deny rows are refusals too: methods and path from what was seen
    w = make_offer(world["db"], KID, world["would"], world["policy"])
    assert [(r["host"], r["methods"], r["paths"]) for r in w.rules] == [("api.example.com", ["POST"], ["/v1/chat"])]


@pytest.mark.parametrize("which", ["allowed", "other"])
def test_only_refused_rows_of_this_kernel(world, which):
    with pytest.raises(AllowRefused) as e:
        make_offer(world["db"], KID, world[which], world["policy"])
    assert e.value.status == 404 and e.value.code == "no-row"
    with pytest.raises(AllowRefused):
        make_offer(world["db"], KID, 10**9, world["policy"])


def test_admin_apply_adds_exactly_the_rule_and_keeps_credentials_and_settings(world):
    old = world["policy"].read_text()
    offer = apply_offer(world["db"], KID, world["connect"], world["policy"], file_hash(old))
    new_rules = added(world["policy"], old)
    assert [(r.host.text, r.schemes, r.ports) for r in new_rules] == [("data.example.org", {"https"}, {443})]
    assert [r.name for r in new_rules] == [offer.rules[0]["name"]]
    before, after = tomllib.loads(old), tomllib.loads(world["policy"].read_text())
    assert after["credential"] == before["credential"] and after["settings"] == before["settings"]
    fields = policy_allow.change_fields(offer, "alice")
    assert fields["url"] == str(world["policy"]) and fields["rule"] == offer.rules[0]["name"]
    assert "'alice'" in fields["reason"] and "data.example.org" in fields["reason"]
    # the same row again: the policy allows it now, nothing more is added
    text = world["policy"].read_text()
    with pytest.raises(AllowRefused) as e:
        apply_offer(world["db"], KID, world["connect"], world["policy"], file_hash(text))
    assert e.value.code == "not-suggestible" and "allows it already" in str(e.value)
    assert world["policy"].read_text() == text


@pytest.mark.parametrize("which,code", [("doh", "doh"), ("address", "address")])
def test_refusals_of_built_in_protections_are_never_applied(world, which, code):
    o = make_offer(world["db"], KID, world[which], world["policy"])
    assert not o.rules and [r["code"] for r in o.as_json(KID, world["db"], world["db"])["refused"]] == [code]
    with pytest.raises(AllowRefused) as e:
        apply_offer(world["db"], KID, world[which], world["policy"], file_hash(POLICY))
    assert e.value.status == 409 and e.value.code == "not-suggestible" and f"[{code}]" in str(e.value)
    assert world["policy"].read_text() == POLICY


def test_a_file_changed_since_the_suggestion_was_shown_is_not_written(world):
    shown = make_offer(world["db"], KID, world["connect"], world["policy"]).as_json(KID, world["db"], world["db"])
    edited = POLICY + '\n[[rule]]\nname = "x"\nhost = "x.example"\naction = "deny"\n'
    world["policy"].write_text(edited)  # someone edits it while the admin reads the suggestion
    with pytest.raises(AllowRefused) as e:
        apply_offer(world["db"], KID, world["connect"], world["policy"], shown["base"])
    assert e.value.code == "changed" and world["policy"].read_text() == edited


def test_a_change_while_it_is_written_is_not_written(world, monkeypatch):
    """The file changes between the offer's read and the write (after the hash check): suggest_io's
    confirm step re-reads it and nothing is written."""
    real = policy_allow.read_policy_text
    calls = []

    def racing(path):
        calls.append(path)
        if len(calls) == 2:  # the confirm step's read: someone appended meanwhile
            path.write_text(POLICY + "# edited\n")
        return real(path)
    monkeypatch.setattr(policy_allow, "read_policy_text", racing)
    with pytest.raises(AllowRefused) as e:
        apply_offer(world["db"], KID, world["connect"], world["policy"], file_hash(POLICY))
    assert e.value.code == "changed"
    assert world["policy"].read_text() == POLICY + "# edited\n"


def test_a_file_that_cannot_be_read_as_toml_is_not_written(world):
    world["policy"].write_text(POLICY + "[[credential]\n")
    with pytest.raises(AllowRefused) as e:
        apply_offer(world["db"], KID, world["connect"], world["policy"], file_hash(POLICY + "[[credential]\n"))
    assert e.value.code == "invalid-policy"


def test_no_policy_file_yet_is_created_with_the_rule(world):
    target = world["policy"].parent / "new" / "policy.toml"
    target.parent.mkdir()
    apply_offer(world["db"], KID, world["connect"], target, file_hash(""))
    assert [r.host.text for r in user_rules(parse_policy(target.read_text(), "t"))] == ["data.example.org"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(min_size=1, max_size=40))
def test_any_guest_chosen_host_is_either_refused_or_added_as_one_exact_rule(tmp_path_factory, host):
    """Names come from the guest (the audit row's host): quotes, newlines, `]]`, unicode. Either
    nothing is written, or exactly one rule whose host is that name and the file re-parses."""
    tmp = tmp_path_factory.mktemp("host")
    db, policy = tmp / "a.sqlite3", tmp / "p.toml"
    policy.write_text(POLICY)
    (rid,) = rows(db, (KID, "connect", dict(url=f"{host}:443", host=host, port=443, decision="deny",
                                            rule="default", code="default-deny")))
    try:
        apply_offer(db, KID, rid, policy, file_hash(POLICY))
    except AllowRefused:
        assert policy.read_text() == POLICY
        return
    new_rules = added(policy, POLICY)
    assert len(new_rules) == 1 and new_rules[0].action == "allow" and "*" not in new_rules[0].host.text
    stored = network.refused_row(db, KID, rid, ("host",))["host"]
    assert new_rules[0].host.text == valid_host(stored)  # the name suggest validated (IDNA), exactly
    assert tomllib.loads(policy.read_text())["credential"] == tomllib.loads(POLICY)["credential"]


# --- the handler's gate, in a real Jupyter server ---------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("allow-server")
    srv = start_server(tmp, args=[f"--CapsemExtension.audit_db={tmp / 'audit.sqlite3'}"])
    status, body = srv.request("POST", "/api/kernels", {"name": "python3"})
    assert status == 201, body
    srv.python_kernel = body["id"]
    yield srv
    srv.stop()


def test_apply_is_refused_without_allow_policy_edits(server):
    k = server.python_kernel
    status, body = server.request("POST", f"/capsem/kernels/{k}/allow", {"row": 1, "base": file_hash("")})
    assert status == 403 and "allow_policy_edits" in body["message"]
    status, _ = server.request("POST", f"/capsem/kernels/{k}/allow", {"row": 1, "base": ""}, token=False)
    assert status == 403


def test_allow_routes_need_auth_and_know_capsem_kernels(server):
    k = server.python_kernel
    assert server.get(f"/capsem/kernels/{k}/allow?row=1", token=False)[0] == 403
    status, body = server.get(f"/capsem/kernels/{k}/allow?row=1")
    assert status == 200 and body["capsem"] is False
    assert server.get("/capsem/kernels/00000000-0000-0000-0000-000000000000/allow?row=1")[0] == 404


# --- observe mode in the server extension's log and in `capsem audit` ---------------------------------

def test_blocked_filter_and_count_include_would_deny(world):
    out = network.query(world["db"], KID, blocked=True)
    assert {r["decision"] for r in out["rows"]} == {"deny", "would-deny"}
    assert world["would"] in [r["id"] for r in out["rows"]] and world["allowed"] not in [r["id"] for r in out["rows"]]
    assert out["blocked"] == 4 and out["total"] == 5


def test_capsem_audit_decision_column_fits_would_deny(world):
    from capsem_vm.proxy.cli import _fmt
    lines = {r["decision"]: _fmt(r) for r in read_events(world["db"], kernel=KID, limit=100) if r["kind"] == "http"}
    # the status column starts at the same place whatever the decision (would-deny is 10 wide)
    starts = {d: line.index(" 403 ") for d, line in lines.items() if " 403 " in line}
    assert {"deny", "would-deny"} <= set(starts) and len(set(starts.values())) == 1, lines

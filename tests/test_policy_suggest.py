"""`capsem policy suggest` (issue 22): rules from refused audit rows, sans-IO logic and the file
append. The real proxy service's rows are in tests/test_policy_suggest_proxy.py."""

from __future__ import annotations

import ipaddress
import tomllib

import pytest
from hypothesis import given, settings, strategies as st

from capsem_vm.policy import default_policy, parse_policy
from capsem_vm.policy.cli import main as policy_main
from capsem_vm.policy.codes import CODES
from capsem_vm.policy.suggest import (
    comment, glob_literal, path_globs, render, rule_key, suggest, toml_string, user_rules, valid_host)
from capsem_vm.policy.suggest_io import SuggestError, apply, parse_since, plan
from capsem_vm.proxy import AuditLog
from capsem_vm.safetext import escape

DENY = dict(decision="deny", code="default-deny")


def dns(host, n=1, **kw):
    return {"kind": "dns", "host": host, "url": host, "method": "A", "count": n, **DENY, **kw}


def conn(host, port=443, n=1, **kw):
    return {"kind": "connect", "host": host, "url": f"{host}:{port}", "port": port, "count": n, **DENY, **kw}


def req(method, url, host, n=1, kind="http", **kw):
    return {"kind": kind, "method": method, "url": url, "host": host, "count": n, **DENY, **kw}


def reparsed(text: str, base: str = "") -> list[tuple]:
    return [rule_key(r) for r in user_rules(parse_policy(base + text))]


def shown(report) -> list[tuple]:
    return [rule_key(d) for d in report.rules()]


def allows(policy_text: str, method: str, url: str) -> bool:
    return parse_policy(policy_text).decide(method, url).allowed


# --- what is suggested ----------------------------------------------------------------------------

def test_dns_and_connect_refusals_give_host_scheme_and_port_only_with_an_honest_note():
    r = suggest([dns("pypi.org", 3), conn("files.pythonhosted.org", 443, 2), conn("db.example.com", 5432)],
                default_policy())
    rules = {d["host"]: d for d in r.rules()}
    assert rules["pypi.org"] == {"name": "suggest-pypi.org", "host": "pypi.org", "scheme": "https", "port": 443,
                                 "action": "allow", "reason": rules["pypi.org"]["reason"]}
    assert rules["files.pythonhosted.org"]["scheme"] == "https" and "methods" not in rules["files.pythonhosted.org"]
    assert rules["db.example.com"]["port"] == 5432 and "paths" not in rules["db.example.com"]
    text = render(r)
    assert "observe mode (trusted code only" in text  # was "(planned, not built yet)" before observe mode
    assert "The scheme is a guess for port 5432" in text
    assert "x3" in text and "x2" in text
    assert reparsed(text) == shown(r)
    after = parse_policy(text)
    assert after.decide_connect("pypi.org").allowed and after.decide_connect("files.pythonhosted.org", 443).allowed
    assert not after.decide_connect("pypi.org", 80).allowed          # only the scheme/port assumed
    assert not after.decide_connect("test.pypi.org").allowed         # no neighbour, no wildcard


def test_methods_and_paths_only_from_rows_that_saw_them_and_as_narrow_as_seen():
    rows = [req("GET", "https://api.example.com:443/v1/models", "api.example.com", 2),
            req("GET", "https://api.example.com:443/v1/files?token=REDACTED", "api.example.com"),
            req("POST", "https://api.example.com:443/upload/one", "api.example.com"),
            conn("api.example.com", 443), dns("api.example.com")]
    r = suggest(rows, default_policy())
    text = render(r)
    assert reparsed(text) == shown(r)
    by_methods = {tuple(d["methods"]): d for d in r.rules()}
    assert by_methods[("GET",)]["paths"] == ["/v1/*"]
    assert by_methods[("POST",)]["paths"] == ["/upload/one"]
    for method, url in [("GET", "https://api.example.com/v1/models"), ("GET", "https://api.example.com/v1/files"),
                        ("POST", "https://api.example.com/upload/one")]:
        assert allows(text, method, url)
    for method, url in [("POST", "https://api.example.com/v1/models"),       # method not seen there
                        ("GET", "https://api.example.com/v2/models"),        # neighbouring path
                        ("POST", "https://api.example.com/upload/two"),
                        ("GET", "http://api.example.com/v1/models"),         # other scheme
                        ("GET", "https://api.example.com:8443/v1/models"),   # other port
                        ("GET", "https://other.example.com/v1/models")]:     # other host
        assert not allows(text, method, url), (method, url)
    assert "DNS lookup of api.example.com" in text and "connection to api.example.com:443" in text


def test_path_globs_never_reach_beyond_the_first_segment_and_escape_glob_characters():
    assert path_globs(["/simple/numpy/"]) == {"/simple/numpy/": ["/simple/numpy/"]}
    assert path_globs(["/simple/numpy/", "/simple/pandas/"]) == {"/simple/*": ["/simple/numpy/", "/simple/pandas/"]}
    assert path_globs(["/a/b/c", "/a/b/d", "/x"]) == {"/a/b/*": ["/a/b/c", "/a/b/d"], "/x": ["/x"]}
    assert path_globs(["/a", "/b"]) == {"/a": ["/a"], "/b": ["/b"]}
    assert glob_literal("/a*b[c]?") == "/a[*]b[[]c[]][?]"
    text = render(suggest([req("GET", "https://h.example.com/a*b", "h.example.com")], default_policy()))
    assert allows(text, "GET", "https://h.example.com/a*b")
    assert not allows(text, "GET", "https://h.example.com/aXXb")


def test_built_in_protections_and_own_deny_rules_are_never_suggested_and_say_why():
    rows = [dns("dns.google", code="doh", rule="doh"),
            conn("metadata.example.com", 80, code="address", rule="address"),
            req("GET", "https://a.example.com/x", "a.example.com", code="host-mismatch", rule="host-mismatch"),
            conn("b.example.com", 443, code="sni-mismatch", rule="sni-mismatch"),
            req("GET", "https://c.example.com/%2e%2e/x", "c.example.com", code="ambiguous-path", rule="ambiguous-path"),
            req("POST", "https://github.com/o/r/git-receive-pack", "github.com", code="rule-deny", rule="github-push"),
            conn("d.example.com", 443, code="resolve", rule="resolve"),
            conn("e.example.com", 443, code="credential", rule="credential")]
    r = suggest(rows, default_policy())
    assert r.rules() == []
    assert {x.code for x in r.refused.values()} == {"doh", "address", "host-mismatch", "sni-mismatch",
                                                    "ambiguous-path", "rule-deny", "resolve", "credential"}
    text = render(r)
    assert reparsed(text) == []
    assert "SSRF protection" in text and "DNS-over-HTTPS" in text and "github-push" in text
    assert "first match wins" in text


def test_every_code_is_either_suggested_or_refused_with_a_reason():
    for code in CODES:
        r = suggest([conn("x.example.com", code=code)], default_policy())
        if code == "default-deny":
            assert r.rules()
        elif code != "audit-rate":
            assert not r.rules() and all(x.why for x in r.refused.values()), code


def test_ip_literals_get_a_loud_comment_and_protected_addresses_stay_commented_out():
    own = (ipaddress.ip_network("192.0.2.0/24"),)  # "this host's own addresses"
    r = suggest([conn("93.184.216.34", 443), conn("10.1.2.3", 22), conn("169.254.169.254", 80),
                 conn("192.0.2.7", 443), conn("::1", 443)], default_policy(), own=own)
    text = render(r)
    assert [d["host"] for d in r.rules()] == ["93.184.216.34"]
    assert "WARNING: 93.184.216.34 is an IP literal" in text
    for host in ("10.1.2.3", "169.254.169.254", "192.0.2.7", "::1"):
        assert f"WARNING: {host} is a protected address" in text
        assert f'# host = "{host}"' in text
    assert reparsed(text) == shown(r)
    assert not parse_policy(text).decide_connect("10.1.2.3", 22).allowed


def test_requests_the_policy_allows_now_are_skipped_and_shadowing_rules_are_reported():
    base = ('[[rule]]\nname = "api"\nhost = "api.example.com"\nmethods = ["GET"]\naction = "allow"\n'
            '[[rule]]\nname = "no-admin"\nhost = "api.example.com"\npaths = ["/admin*"]\naction = "deny"\n')
    policy = parse_policy(base)
    rows = [req("GET", "https://api.example.com/x", "api.example.com"),       # allowed by now
            req("POST", "https://api.example.com/admin/x", "api.example.com"),  # the deny rule comes first
            req("POST", "https://api.example.com/data", "api.example.com")]
    r = suggest(rows, policy, base_text=base)
    assert r.already_allowed == 1
    assert [d.get("paths") for d in r.rules()] == [["/data"]]
    still = [x for x in r.refused.values() if "still refused by rule 'no-admin'" in x.why]
    assert still and "/admin/x" in still[0].what
    assert reparsed(render(r), base + "\n") == [rule_key(x) for x in user_rules(policy)] + shown(r)


def test_audit_rate_rows_are_counted_not_guessed():
    r = suggest([{"kind": "note", "decision": "deny", "code": "audit-rate", "count": 40}], default_policy())
    assert r.folded == 40 and not r.rules()
    assert "40 more were only counted" in render(r)


# --- names come from the guest --------------------------------------------------------------------

HOSTILE = ['evil"]]\n[[rule]]\nhost = "*"', 'a.example.com"\nname = "x', "x]]", "a\nb.example.com",
           "\\x0a.example.com", "b\u202eexample.com", "xn--zz.example.com", "*", "*.example.com", "",
           "a b.example.com", 'q"uote.example.com', "\x00.example.com", "0x7f.1.2.3.4.5"]


@pytest.mark.parametrize("host", HOSTILE)
def test_hostile_names_are_refused_and_never_reach_the_toml(host):
    for row in (dns(host), conn(host), req("GET", f"https://{host}/x", host), dns(escape(host))):
        r = suggest([row], default_policy())
        assert r.rules() == [], (host, r.rules())
        text = render(r)
        assert reparsed(text) == []
        assert all(line == "" or line.startswith("#") for line in text.splitlines())


def test_valid_host_accepts_names_idna_and_ip_literals_only():
    assert valid_host("PyPI.org.") == "pypi.org"
    assert valid_host("xn--bcher-kva.example") == "xn--bcher-kva.example"
    assert valid_host("bücher.example") == "xn--bcher-kva.example"
    assert valid_host("0x7f.1") == "127.0.0.1"
    for bad in HOSTILE:
        assert valid_host(bad) is None, bad


def test_hostile_paths_and_methods_are_escaped_or_refused():
    rows = [req("GET", 'https://h.example.com/a"b]]c', "h.example.com"),
            req("GET", "https://h.example.com/x\n[[rule]]", "h.example.com"),
            req("G\"ET", "https://h.example.com/m", "h.example.com"),
            req("GET", "https://h.example.com/%0a", "h.example.com"),
            req("GET", "https://other.example.com/p", "h.example.com")]   # URL and host disagree
    r = suggest(rows, default_policy())
    text = render(r)
    assert reparsed(text) == shown(r)
    assert [d["paths"] for d in r.rules()] == [["/a%22b%5D%5Dc"]]     # canonical, percent-encoded
    assert allows(text, "GET", 'https://h.example.com/a"b]]c')
    assert len(r.refused) == 4


def test_toml_strings_and_comments_are_safe_for_any_text():
    for text in ['"', "\\", "\n", "]]", "\x7f", "é", "\U0001F600", "a\u2028b"]:
        assert tomllib.loads(f"k = {toml_string(text)}")["k"] == text
        line = comment(text + "\n[[rule]]")
        assert "\n" not in line and line.isascii() and line.startswith("# ")


_text = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=40),
                  st.text(alphabet='ab."]\n\\*[ /%:-_xn', max_size=30))
_host = st.one_of(st.sampled_from(["pypi.org", "a.example.com", "xn--bcher-kva.example", "1.2.3.4", "10.0.0.1",
                                   "2001:db8::1"]), _text)
_row = st.builds(
    lambda kind, host, port, method, path, code, n, url_host: {
        "kind": kind, "host": host, "port": port, "method": method, "count": n, "decision": "deny", "code": code,
        "url": (host if kind == "dns" else f"{host}:{port}" if kind == "connect"
                else f"{ {'http': 'https', 'websocket': 'wss'}.get(kind, 'tcp')}://{url_host or host}:{port}{path}")},
    st.sampled_from(["dns", "connect", "http", "http", "http", "websocket", "tcp", "note", "weird"]), _host,
    st.one_of(st.sampled_from([443, 80, 8443]), st.integers(-1, 70000), st.none(), st.text(max_size=3)), st.one_of(st.sampled_from(["GET", "POST"]), _text),
    st.one_of(st.sampled_from(["/", "/a/b", "/a/c", "/x*"]), _text.map(lambda t: "/" + t)),
    st.one_of(st.just("default-deny"), st.sampled_from(sorted(CODES) + [None, "nope"])), st.integers(0, 5),
    st.one_of(st.none(), _host))


@settings(max_examples=300)
@given(rows=st.lists(_row, max_size=12))
def test_rendered_suggestions_reparse_to_exactly_the_rules_shown_and_allow_what_they_list(rows):
    r = suggest(rows, default_policy())
    text = render(r)
    assert reparsed(text) == shown(r)                 # nothing a guest chose changed the rules
    for line in text.splitlines():
        assert line == "" or line.startswith("#") or line.isascii() and line.isprintable()
    policy = parse_policy(text)
    for s in r.suggestions:
        assert s.rule["host"] != "*" and "*" not in s.rule["host"] and valid_host(s.rule["host"]) == s.rule["host"]
        if not s.active:
            continue
        for e in s.seen:
            if e.kind == "dns":
                assert policy.decide_connect(e.host).allowed
            elif e.kind == "connect":
                assert policy.decide_connect(e.host, e.port).allowed
            else:
                assert policy.decide(e.method or "GET", e.url()).allowed
        if ":" not in s.host:
            assert not policy.decide_connect("zz-" + s.host).allowed  # a neighbouring name


# --- applying ---------------------------------------------------------------------------------------

BASE = """version = 1
[[rule]]
name = "pypi"
include = "pypi"

[[credential]]
name = "gh"
hosts = ["api.github.com"]
env = "GITHUB_TOKEN"
header = "Authorization"
# a comment with no newline at the end"""


def _report():
    return suggest([req("GET", "https://api.example.com/v1/x", "api.example.com")], default_policy())


def test_apply_appends_after_the_diff_and_keeps_everything_else(tmp_path):
    f = tmp_path / "policy.toml"
    base = BASE.replace('name = "pypi"\n', "")
    f.write_text(base)
    link = tmp_path / "link.toml"
    link.symlink_to(f)
    r = _report()
    seen = []
    assert apply(link, render(r, for_apply=True), r.rules(), lambda d: seen.append(d) or True)
    new = f.read_text()
    assert new.startswith(base + "\n") and link.is_symlink()
    assert "+[[rule]]" in seen[0] and '+host = "api.example.com"' in seen[0]
    assert reparsed(new) == [rule_key(x) for x in user_rules(parse_policy(base))] + shown(r)
    assert tomllib.loads(new)["credential"] == tomllib.loads(base)["credential"]


def test_apply_leaves_the_file_untouched_on_any_error_or_no(tmp_path):
    f = tmp_path / "policy.toml"
    r = _report()
    add = render(r, for_apply=True)
    cases = {
        "invalid": 'version = 1\n[[rule]]\nname = "x"\n',                    # not a valid policy
        "inline": 'rule = [{name = "a", host = "a.example.com", action = "allow"}]\n',  # [[rule]] cannot extend it
        "not-utf8": None,
    }
    for name, text in cases.items():
        if text is None:
            f.write_bytes(b"# \xff\n")
        else:
            f.write_text(text)
        before = f.read_bytes()
        with pytest.raises(SuggestError):
            apply(f, add, r.rules(), lambda d: True)
        assert f.read_bytes() == before, name
    f.write_text(BASE.replace('name = "pypi"\n', ""))
    before = f.read_bytes()
    assert apply(f, add, r.rules(), lambda d: False) is False          # the user said no
    assert f.read_bytes() == before

    def change_it(d):                                                  # someone edits it meanwhile
        f.write_text(before.decode() + "\n# edited\n")
        return True
    with pytest.raises(SuggestError, match="changed while"):
        apply(f, add, r.rules(), change_it)
    assert f.read_text() == before.decode() + "\n# edited\n"
    with pytest.raises(SuggestError):                                   # text that is not the rules shown
        apply(f, add.replace('"/v1/x"', '"/v1/*"'), r.rules(), lambda d: True)
    with pytest.raises(SuggestError):                                   # a credential smuggled in
        plan("", add + '\n[[credential]]\nname = "c"\nhosts = ["a.example.com"]\nenv = "X"\nheader = "A"\n',
             r.rules(), "p")
    missing = tmp_path / "new.toml"
    assert apply(missing, add, r.rules(), lambda d: True) and reparsed(missing.read_text()) == shown(r)


def test_parse_since():
    assert parse_since("2h", now=10_000) == 10_000 - 7200
    assert parse_since("30m", now=10_000) == 10_000 - 1800
    assert parse_since("1700000000") == 1700000000
    assert parse_since("2026-12-02T09:00:00+00:00") == 1796202000
    with pytest.raises(ValueError):
        parse_since("yesterday")


# --- the command, on rows written by the real AuditLog writer ------------------------------------------

def test_cli_reads_the_audit_database_prints_toml_and_applies(tmp_path, capsys):
    db = tmp_path / "audit.sqlite3"
    log = AuditLog(db)
    log.record("k-1", "dns", method="A", url="pypi.org", host="pypi.org", status=3, decision="deny",
               rule="default", code="default-deny", reason="no rule")
    log.record("k-1", "http", method="GET", url="https://api.example.com:443/v1/x", host="api.example.com",
               port=443, status=403, decision="deny", rule="default", code="default-deny", reason="no rule")
    log.record("k-2", "connect", url="other.example.com:443", host="other.example.com", port=443,
               decision="deny", rule="default", code="default-deny", reason="no rule")
    log.record("k-1", "connect", url='evil"]]\n.example.com:443', host='evil"]]\n.example.com', port=443,
               decision="deny", rule="invalid-host", code="invalid-host", reason="bad")
    log.close()
    policy = tmp_path / "policy.toml"
    assert policy_main(["policy", "suggest", "--db", str(db), "--kernel", "k-1", "--policy", str(policy)]) == 0
    out = capsys.readouterr().out
    hosts = [r.host.text for r in user_rules(parse_policy(out))]
    assert hosts == ["api.example.com", "pypi.org"]                   # k-2's refusal is not k-1's
    assert "invalid-host" in out
    assert not policy.exists()
    assert policy_main(["policy", "suggest", "--db", str(db), "--kernel", "k-1", "--apply", str(policy)]) == 1
    assert not policy.exists()                                        # no terminal, no --yes: not applied
    assert policy_main(["policy", "suggest", "--db", str(db), "--kernel", "k-1", "--apply", str(policy),
                        "--yes"]) == 0
    applied = parse_policy(policy.read_text())
    assert applied.decide("GET", "https://api.example.com/v1/x").allowed
    assert not applied.decide("GET", "https://api.example.com/v1/y").allowed
    capsys.readouterr()
    assert policy_main(["policy", "suggest", "--db", str(db), "--kernel", "k-1", "--apply", str(policy),
                        "--yes"]) == 0
    out = capsys.readouterr().out
    assert "2 of them are allowed by the current policy already" in out and "Nothing to suggest" in out
    assert policy_main(["policy", "suggest", "--db", str(tmp_path / "none.sqlite3")]) == 2


def test_cli_asks_on_the_terminal_and_only_yes_appends(tmp_path, capsys, monkeypatch):
    import io
    db = tmp_path / "audit.sqlite3"
    log = AuditLog(db)
    log.record("k-1", "connect", url="api.example.com:443", host="api.example.com", port=443,
               decision="deny", rule="default", code="default-deny", reason="no rule")
    log.close()
    policy = tmp_path / "policy.toml"
    policy.write_text("version = 1\n")

    class Tty(io.StringIO):
        def isatty(self):
            return True
    args = ["policy", "suggest", "--db", str(db), "--apply", str(policy)]
    monkeypatch.setattr("sys.stdin", Tty("n\n"))
    assert policy_main(args) == 1 and policy.read_text() == "version = 1\n"
    out, err = capsys.readouterr()
    assert "Append 1 rule(s)" in err and "+[[rule]]" in err and "rule(s) to" not in out
    monkeypatch.setattr("sys.stdin", Tty("y\n"))
    assert policy_main(args) == 0
    assert parse_policy(policy.read_text()).decide_connect("api.example.com", 443).allowed


def test_suggested_names_do_not_repeat_the_policys_rule_names():
    base = ('[[rule]]\nname = "suggest-api.example.com"\nhost = "api.example.com"\nmethods = ["GET"]\n'
            'paths = ["/a"]\naction = "allow"\n')
    r = suggest([req("GET", "https://api.example.com/b", "api.example.com"),
                 req("POST", "https://api.example.com/c", "api.example.com")], parse_policy(base), base_text=base)
    names = [d["name"] for d in r.rules()]
    assert names == ["suggest-api.example.com-2", "suggest-api.example.com-3"]
    assert reparsed(render(r), base + "\n")[1:] == shown(r)
    long = ".".join(["a" * 63] * 3) + ".example"          # a 200-character name
    r = suggest([conn(long), conn(long, 8443)], default_policy())
    assert all(len(d["name"]) <= 64 for d in r.rules()) and reparsed(render(r)) == shown(r)
    assert len({d["name"] for d in r.rules()}) == 2


def test_hosts_a_preset_covers_point_to_the_preset():
    text = render(suggest([dns("pypi.org"), dns("conda.anaconda.org"), dns("x.example.com")], default_policy()))
    assert 'Preset `include = "pypi"` covers this host' in text
    assert '`include = "conda"` or `include = "conda-forge"`' in text
    assert text.count("Preset ") == 2

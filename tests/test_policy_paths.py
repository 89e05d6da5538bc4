"""Path spellings (issue 15 item 2), pure: the canonicaliser's properties, and that no spelling of a
denied path is allowed in a form a liberal server reads as that path. The same properties through
the real proxy and a real server are in tests/test_proxy_paths_addresses.py."""

from __future__ import annotations

import textwrap

from hypothesis import example, given, settings, strategies as st

from capsem_vm.policy import parse_policy
from capsem_vm.policy.paths import UNRESERVED, canonical_target, canonicalize

from path_spellings import denied_spelling, liberal_readings, reads_as, rfc_spelling

POLICY = parse_policy(textwrap.dedent("""
    [[rule]]
    name = "admin"
    host = "api.test"
    paths = ["/admin*", "/Private/*"]
    action = "deny"

    [[rule]]
    name = "public"
    host = "api.test"
    paths = ["/public/*"]
    action = "allow"

    [[rule]]
    name = "rest"
    host = "other.test"
    action = "allow"
"""), "paths.toml")
DENIED = {"api.test": ["/admin*", "/private/*"], "other.test": ["/dns-query", "/dns-query/*"]}


def forwarded(host: str, target: str):
    """(decision, target the proxy sends upstream) for a raw origin-form target."""
    sent = canonical_target(target)  # what guard.requestheaders puts in the request
    return POLICY.decide("GET", f"https://{host}{sent}"), sent


# --- the canonicaliser ------------------------------------------------------------------------------

@given(st.text(st.characters(exclude_categories=[]), max_size=80)
       | st.text(alphabet="/.%2eEfFaA;\\\n\x00", max_size=30).map(lambda t: "/" + t))
@example("/a/%2e%2e/%2E./b;%zz%u002e\\\x00\udcff\uff0e#")
@example("/admin\n")
@example("\x1f/..")
def test_canonicalize_is_total_idempotent_and_canonical(raw):
    c = canonicalize(raw)
    again = canonicalize(c.path)
    assert (again.path, again.loose) == (c.path, c.loose)
    # the canonical form is never more ambiguous than the raw path; it may be less, when dot-segment
    # removal drops the ambiguous segment ('\x1f/..' is '/'): the request was judged ambiguous
    # (deny rules match it, allow rules with paths do not), and '/' is what goes upstream
    assert not again.ambiguous or c.ambiguous
    assert c.path.startswith("/") and c.path.isascii()
    assert not any(seg in (".", "..") for seg in c.path.split("/"))
    for i, ch in enumerate(c.path):
        if ch == "%" and c.path[i + 1:i + 3].isalnum() and len(c.path[i + 1:i + 3]) == 2:
            esc = c.path[i + 1:i + 3]
            if all(x in "0123456789abcdefABCDEF" for x in esc):
                assert esc == esc.upper() and chr(int(esc, 16)) not in UNRESERVED
    assert canonicalize(raw) == c  # deterministic


@given(st.binary(max_size=60))
def test_canonicalize_any_bytes_as_mitmproxy_decodes_them(data):
    c = canonicalize("/" + data.decode("utf-8", "surrogateescape"))
    assert c.path.isascii()


@given(st.data(), st.sampled_from(["/public/a", "/admin/users", "/public/x-y_z~1/", "/v1/items"]))
def test_rfc_equivalent_spellings_have_one_canonical_form(data, base):
    spelled = data.draw(rfc_spelling(base))
    c = canonicalize(spelled)
    assert c.path == base.rstrip("/") + ("/" if base.endswith("/") else "") and not c.ambiguous, (spelled, c)


# --- decisions ----------------------------------------------------------------------------------------

@settings(max_examples=600)
@given(st.data(), st.sampled_from(["/admin", "/admin/users", "/private/key", "/Private/key"]))
def test_no_spelling_of_a_denied_path_is_allowed_as_that_path(data, base):
    target = data.draw(denied_spelling(base))
    d, sent = forwarded("api.test", target)
    if d.allowed:
        assert not reads_as(sent, DENIED["api.test"]), (target, sent, d)
    # what is sent is what was judged: judging it again gives the same decision
    assert POLICY.decide("GET", f"https://api.test{sent}") == d


@settings(max_examples=400)
@given(st.data(), st.sampled_from(["/dns-query", "/dns-query/x"]))
def test_no_spelling_of_the_doh_path_is_allowed(data, base):
    target = data.draw(denied_spelling(base))
    d, sent = forwarded("other.test", target)
    if d.allowed:
        assert not reads_as(sent, DENIED["other.test"]), (target, sent, d)
    else:
        assert d.code in ("doh", "ambiguous-path"), d


@given(st.data(), st.sampled_from(["/public/a", "/public/x-y_z~1"]))
def test_rfc_spellings_of_an_allowed_path_are_allowed_and_sent_canonical(data, base):
    target = data.draw(rfc_spelling(base))
    d, sent = forwarded("api.test", target)
    assert d.allowed and d.rule == "public" and sent == base, (target, sent, d)


@given(st.text(alphabet="/.%2eEfF5cCbB3;\\a\x00u", max_size=30))
def test_ambiguous_paths_never_match_allow_rules_and_always_match_deny_rules(tail):
    d = POLICY.decide("GET", "https://api.test/public/" + tail)
    c = canonicalize("/public/" + tail)
    if c.ambiguous:
        assert not d.allowed and d.code in ("ambiguous-path", "rule-deny", "doh"), (tail, d)


def test_listed_spellings():
    for target, code in [("/%61dmin", "rule-deny"), ("//admin", "rule-deny"), ("/ADMIN", "rule-deny"),
                         ("/admin;x", "ambiguous-path"), ("/x/..;/admin", "ambiguous-path"), ("/public/..%2fadmin", "ambiguous-path"),
                         ("/public/%2e%2e/admin", "rule-deny"), ("/public/x;y", "ambiguous-path"),
                         ("/%2561dmin", "ambiguous-path"), ("/public/a\\..\\..\\admin", "ambiguous-path")]:
        d, sent = forwarded("api.test", target)
        assert not d.allowed and d.code == code, (target, d)
    assert forwarded("other.test", "/DNS-Query")[0].code == "doh"
    assert forwarded("other.test", "/dns%2Dquery")[0].code == "doh"
    assert forwarded("other.test", "/x/..;/dns-query")[0].code == "doh"
    assert liberal_readings("/x/..;/ADMIN") == {"/admin"}

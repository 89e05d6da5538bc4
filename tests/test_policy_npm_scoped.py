"""npm's scoped package spelling `/@scope%2Fname` (an encoded '/') under the built-in DoH path rule
and user deny rules: it passes where both of its readings pass, and every other path with an
ambiguous spelling (every other encoded-slash spelling among them) stays refused as before.
Pure policy logic; the real npm client is in test_preset_clients.py."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from hypothesis import given, settings
from hypothesis import strategies as st

from capsem_vm.policy import parse_policy
from capsem_vm.policy.paths import canonicalize

NPM = parse_policy('[[rule]]\ninclude = "npm"\n', "npm.toml")
SHAPE = re.compile(r"/@[a-z0-9~-][a-z0-9._~-]*%2F[a-z0-9~-][a-z0-9._~-]*")


def decide(path: str, policy=NPM, method: str = "GET"):
    return policy.decide(method, "https://registry.npmjs.org" + path)


def test_scoped_packuments_as_npm_asks_for_them_pass_the_npm_preset():
    for path in ("/@types%2fnode", "/@types%2Fnode", "/@capsem%2fhello-scoped", "/@a%2fb.c_d~e-f",
                 "/@types%2F%6Eode"):  # an escaped unreserved letter is decoded first
        d = decide(path)
        assert d.allowed and d.rule == "npm-registry", (path, d)


def test_other_encoded_slash_spellings_stay_refused():
    for path in ("/@types%252fnode",       # double encoding
                 "/@types%2f%2fnode", "/@types%2fnode%2fx", "/@a%2fb/c",  # more than the one '/'
                 "/types%2fnode", "/%40types%2fnode/x/%2f",             # not a scope
                 "/@Types%2fnode", "/@types%2fNode",                    # not npm's lowercase names
                 "/@types%2f..", "/@types%2f.x", "/@types%2f_x", "/@.x%2fnode", "/@%2fnode", "/@x%2f",
                 "/@types%2fnode;x", "/@types%2fnode%3b", "/@types%5cnode", "/@types\\node",
                 "/@types%2fno%00de", "/@dns-query%2f%2e%2e%2fdns-query", "/x/%2e%2e%2fdns-query",
                 "/@x%2f%2e%2e%2f%2e%2e%2fdns-query"):
        d = decide(path)
        assert not d.allowed and d.code in ("ambiguous-path", "doh"), (path, d)


def test_user_deny_rules_judge_both_readings():
    p = parse_policy('[[rule]]\nname = "no-evil"\nhost = "registry.npmjs.org"\npaths = ["/@evil/*"]\n'
                     'action = "deny"\n\n[[rule]]\ninclude = "npm"\n', "p.toml")
    assert decide("/@evil%2fpkg", p).code == "rule-deny"  # the decoded reading matches
    q = parse_policy('[[rule]]\nname = "no-raw"\nhost = "registry.npmjs.org"\npaths = ["/@evil%2Fpkg"]\n'
                     'action = "deny"\n\n[[rule]]\ninclude = "npm"\n', "q.toml")
    assert decide("/@evil%2fpkg", q).code == "rule-deny"  # the encoded reading matches
    assert decide("/@good%2fpkg", p).allowed and decide("/@good%2fpkg", q).allowed


def test_allow_rules_with_paths_still_refuse_it():
    p = parse_policy('[[rule]]\nname = "scoped"\nhost = "registry.npmjs.org"\npaths = ["/@types/*"]\n'
                     'action = "allow"\n', "p.toml")
    assert not decide("/@types%2fnode", p).allowed


_PIECES = st.sampled_from(["/", "@", "%2f", "%2F", "%252f", "%25", "%5c", "\\", ";", "%3b", ".", "..",
                           "%2e", "dns-query", "types", "node", "A", "_", "~", "-", "%00", "%C0%AE", "?",
                           "%3f", "#", "%23", "x"])
PATHS = st.lists(_PIECES, max_size=10).map(lambda xs: "/" + "".join(xs))


@settings(max_examples=1500, deadline=None)
@given(PATHS)
def test_an_ambiguous_path_passes_the_doh_rule_only_in_npms_exact_shape(path):
    c = canonicalize(urlsplit("https://registry.npmjs.org" + path).path or "/")  # '?', '#' end the path
    d = decide(path)
    if c.ambiguous:
        assert d.allowed == bool(SHAPE.fullmatch(c.path)), (path, c, d)
        if d.allowed:
            # both readings are plain and neither is a DoH path
            assert "%" not in c.loose and not c.loose.startswith("/dns-query")
            assert c.path.count("%") == 1 and not c.path.startswith("/dns-query")
    else:
        doh = c.path == "/dns-query" or c.path.startswith("/dns-query/") or \
            c.loose == "/dns-query" or c.loose.startswith("/dns-query/")
        assert d.allowed == (not doh), (path, c, d)


@settings(max_examples=800, deadline=None)
@given(st.from_regex(r"\A/@[a-z0-9~-][a-z0-9._~-]{0,20}%2[fF][a-z0-9~-][a-z0-9._~-]{0,20}\Z"),
       st.sampled_from(["/@evil/*", "/@*/evil*", "/dns-query*", "/@e*"]))
def test_in_the_shape_a_deny_rule_matches_exactly_when_a_reading_does(path, glob):
    from fnmatch import fnmatchcase
    p = parse_policy(f'[[rule]]\nname = "d"\nhost = "registry.npmjs.org"\npaths = ["{glob}"]\n'
                     'action = "deny"\n\n[[rule]]\ninclude = "npm"\n', "p.toml")
    c = canonicalize(path)
    readings = (c.path, path.replace("%2f", "/").replace("%2F", "/"))
    assert decide(path, p).allowed == (not any(fnmatchcase(r.lower(), glob) for r in readings)), (path, glob)

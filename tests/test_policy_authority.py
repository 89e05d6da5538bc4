"""capsem_vm.policy.authority: do the names a request carries agree with the judged destination?
Pure properties (hypothesis); the end-to-end checks with a real proxy and upstream are in
tests/test_proxy_names.py."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from capsem_vm.policy.authority import agrees, authority, disagreement, split_authority
from capsem_vm.policy.match import normalize_host

JUDGED, JUDGED_PORT = "allowed.test.example", 8443

# spellings -> the destination they name (the oracle: which spellings are the same host)
BASES = {
    "allowed.test.example": "allowed.test.example",
    "other.test.example": "other.test.example",
    "allowed.test.example.evil": "allowed.test.example.evil",
    "evil-allowed.test.example": "evil-allowed.test.example",
    "test.example": "test.example",
    "bücher.test.example": "xn--bcher-kva.test.example",
    "xn--bcher-kva.test.example": "xn--bcher-kva.test.example",
    "127.0.0.1": "127.0.0.1",
    "[::1]": "::1",
    "[0:0:0:0:0:0:0:1]": "::1",
    "\u0430llowed.test.example": "xn--llowed-2nf.test.example",  # Cyrillic a: a homograph, another name
    "\uff41llowed.test.example": "allowed.test.example",  # fullwidth a: IDNA maps it to ASCII, the same name
}


def spell(base: str, flips: list[bool], dot: bool) -> str:
    text = "".join(c.upper() if f else c for c, f in zip(base, flips + [False] * len(base)))
    return text + ("." if dot and not base.startswith(("[", "1")) else "")


@settings(max_examples=1500)
@given(base=st.sampled_from(sorted(BASES)), judged=st.sampled_from(sorted(set(BASES.values()))),
       flips=st.lists(st.booleans(), max_size=30), dot=st.booleans(),
       port=st.one_of(st.none(), st.sampled_from([JUDGED_PORT, 443, 80, 1, 65535]), st.integers(1, 65535)),
       userinfo=st.sampled_from(["", "u@", "u:p@", "allowed.test.example@", ":@"]))
def test_agrees_exactly_when_the_spelling_names_the_judged_host_and_port(base, judged, flips, dot, port, userinfo):
    text = userinfo + spell(base, flips, dot) + ("" if port is None else f":{port}")
    expected = BASES[base] == judged and (443 if port is None else port) == JUDGED_PORT and not userinfo
    assert agrees(text, judged, JUDGED_PORT, 443) is expected, text
    assert agrees(text.encode(), judged, JUDGED_PORT, 443) is expected, text
    # the default port stands for a missing one, and only for it
    if port is None and not userinfo and BASES[base] == judged:
        assert agrees(text, judged, 443, 443) and not agrees(text, judged, 80, 443)


@given(host=st.sampled_from(sorted(set(BASES.values()))), port=st.integers(1, 65535), default=st.sampled_from([80, 443]))
def test_the_canonical_authority_agrees_with_itself_and_nothing_else(host, port, default):
    canon = authority(host, port, default)
    assert agrees(canon, host, port, default)
    assert split_authority(canon) == (host, None if port == default else port)
    for other in set(BASES.values()) - {host}:
        assert not agrees(canon, other, port, default)
    assert not agrees(canon, host, port % 65535 + 1, default)


@given(st.one_of(st.text(max_size=400), st.binary(max_size=400)))
def test_split_authority_is_total(text):
    parsed = split_authority(text)
    assert parsed is None or (isinstance(parsed[0], str) and (parsed[1] is None or 0 < parsed[1] < 65536))
    assert isinstance(agrees(text, JUDGED, JUDGED_PORT, 443), bool)
    why = disagreement([("Host", text)], JUDGED, JUDGED_PORT, 443)
    assert why is None or (why.isprintable() and len(why) < 400)


def test_strict_spellings_never_agree():
    for text in ("", ":8443", "allowed.test.example:", "allowed.test.example:08443", "allowed.test.example:+8443",
                 "allowed.test.example: 8443", "allowed.test.example :8443", "allowed.test.example:8443:8443",
                 "allowed.test.example:8443/", "allowed.test.example:8443?", "allowed.test.example:8443#",
                 "[allowed.test.example]:8443", "allowed.test.example,allowed.test.example:8443",
                 "allowed.test.example\x00:8443", "allowed.test.example\t:8443", "u@allowed.test.example:8443",
                 "allowed.test.example:8443@allowed.test.example:8443", "2130706433:8443", "allowed..test.example:8443",
                 b"allowed.test.example\xff:8443", "allowed.test.example:99999", "a" * 400):
        assert not agrees(text, JUDGED, JUDGED_PORT, 443), text
    assert disagreement([("Host", "allowed.test.example:8443"), ("request target", "other.test.example:8443")],
                        JUDGED, JUDGED_PORT, 443) == \
        "request target 'other.test.example:8443' does not name the destination 'allowed.test.example:8443'"
    # IPv6 destinations are bracketed in the canonical form; bare v6 never agrees
    assert authority("::1", 443, 443) == "[::1]" and authority("::1", 8443, 443) == "[::1]:8443"
    assert not agrees("::1", "::1", 443, 443)
    assert normalize_host("ALLOWED.test.example.") == JUDGED

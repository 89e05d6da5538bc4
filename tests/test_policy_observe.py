"""Observe mode, the pure parts: the setting, which refusals become would-deny, and what a would-deny
may reach. Pure and fast; the proxy end to end is tests/test_proxy_observe.py."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, strategies as st

from capsem_vm.policy import DENY, Decision, PolicyError, parse_policy
from capsem_vm.policy.addresses import protected_class
from capsem_vm.policy.codes import CODES
from capsem_vm.policy.model import ALLOW, OBSERVABLE_CODES, WOULD_DENY

RULES = """
[[rule]]
name = "api"
host = "api.example.com"
methods = ["GET"]
paths = ["/v1/*"]
addresses = ["10.1.2.3"]
action = "allow"

[[rule]]
name = "no-admin"
host = "api.example.com"
paths = ["/admin*"]
action = "deny"

[[rule]]
name = "no-lan"
host = "10.0.0.0/8"
action = "deny"

[[rule]]
name = "no-loop"
host = "127.0.0.0/8"
action = "deny"
"""
OBSERVE = parse_policy("[settings]\nobserve = true\n" + RULES, "o.toml")
STRICT = parse_policy(RULES, "s.toml")


def test_the_setting_is_off_unless_written_and_only_takes_booleans():
    assert not STRICT.observe and OBSERVE.observe
    assert not parse_policy("[settings]\nobserve = false\n").observe
    assert not parse_policy("").observe
    with pytest.raises(PolicyError, match="'observe' must be true or false"):
        parse_policy('[settings]\nobserve = "yes"\n')
    with pytest.raises(PolicyError, match="allowed: allow_doh, observe"):
        parse_policy("[settings]\nobserv = true\n")


def test_observable_codes_are_the_policys_own_refusals():
    assert OBSERVABLE_CODES == {"default-deny", "rule-deny"} and OBSERVABLE_CODES <= set(CODES)


@given(st.sampled_from(sorted(CODES)), st.sampled_from([ALLOW, DENY]), st.booleans())
def test_only_policy_refusals_become_would_deny(code, action, observe):
    policy = OBSERVE if observe else STRICT
    d = Decision(action, "r", "why", code=code)
    got = policy.observed(d)
    if observe and action == DENY and code in OBSERVABLE_CODES:
        assert got.action == WOULD_DENY and got.code == code and got.rule == "r" and got.reason == "why"
        assert got.passes and not got.allowed
    else:
        assert got is d and got.passes == got.allowed == (action == ALLOW)


@pytest.mark.parametrize("method, url, code, rule", [
    ("POST", "https://api.example.com/v1/x", "default-deny", "default"),
    ("GET", "https://other.example.org/", "default-deny", "default"),
    ("GET", "https://api.example.com/admin/x", "rule-deny", "no-admin"),
    ("GET", "https://api.example.com/ADMIN", "rule-deny", "no-admin"),
])
def test_requests_the_rules_refuse_pass_as_would_deny(method, url, code, rule):
    strict = STRICT.decide(method, url)
    assert strict.action == DENY and strict.code == code and strict.rule == rule
    d = OBSERVE.observed(OBSERVE.decide(method, url))
    assert d.action == WOULD_DENY and d.code == code and d.rule == rule


@pytest.mark.parametrize("method, url, code", [
    ("GET", "https://api.example.com/dns-query", "doh"),
    ("GET", "https://dns.google/resolve", "doh"),
    ("GET", "https://api.example.com/admin%2fx", "ambiguous-path"),
    ("GET", "https://api.example.com/v1/..;/admin", "ambiguous-path"),
    ("GET", "ftp://api.example.com/", "invalid-url"),
    ("GET", "https://bad_host!/", "invalid-host"),
])
def test_built_in_refusals_stay_refusals(method, url, code):
    d = OBSERVE.observed(OBSERVE.decide(method, url))
    assert d.action == DENY and d.code == code and not d.passes


def test_dns_and_connect_decisions_of_doh_hosts_stay_refusals():
    for d in (OBSERVE.decide_connect("dns.google"), OBSERVE.decide_connect("dns.google", 443)):
        assert OBSERVE.observed(d).action == DENY and d.code == "doh"
    d = OBSERVE.observed(OBSERVE.decide_connect("elsewhere.example.org", 443))
    assert d.action == WOULD_DENY and d.code == "default-deny"


OWN = (ipaddress.ip_network("192.0.2.77/32"),)
addresses = st.one_of(st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
                      st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address))


@given(addresses)
def test_a_would_deny_reaches_exactly_the_unprotected_addresses(ip):
    # whatever decided it: no rule, a deny rule on the very network, a deny rule on the host
    for d in (OBSERVE.decide_connect("elsewhere.example.org", 443), OBSERVE.decide_connect("10.1.2.3", 443),
              OBSERVE.decide_connect("127.0.0.1", 80), OBSERVE.decide("GET", "https://api.example.com/admin")):
        w = OBSERVE.observed(d)
        assert w.action == WOULD_DENY
        assert w.address_allowed(ip, OWN) == (protected_class(ip, OWN) is None)


def test_an_allow_rule_naming_a_protected_address_still_reaches_it():
    d = OBSERVE.observed(OBSERVE.decide("GET", "https://api.example.com/v1/x"))
    assert d.allowed and d.address_allowed("10.1.2.3", OWN) and not d.address_allowed("10.1.2.4", OWN)
    w = OBSERVE.observed(OBSERVE.decide("POST", "https://api.example.com/v1/x"))
    assert w.action == WOULD_DENY and not w.address_allowed("10.1.2.3", OWN)

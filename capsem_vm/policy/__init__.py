"""Egress policy: TOML rules, default deny, first match wins. Pure (no network, no mitmproxy).

    from capsem_vm.policy import load_policy, load_kernel_policy
    policy = load_policy("policy.toml")
    d = policy.decide("GET", "https://pypi.org/simple/numpy/")   # Decision(action, rule, reason)
    policy.decide_connect("pypi.org", 443)                         # before any byte is seen
"""

from .loader import PolicyError, default_policy, load_policy, parse_policy
from .model import ALLOW, DENY, Credential, Decision, Policy, Rule
from .source import load_kernel_policy, resolve_policy_path, user_policy_path

__all__ = [
    "ALLOW", "DENY", "Credential", "Decision", "Policy", "PolicyError", "Rule", "default_policy",
    "load_kernel_policy", "load_policy", "parse_policy", "resolve_policy_path", "user_policy_path",
]

"""A kernel's active egress policy, rendered for people: one JSON object per rule, plus a one-line
summary in the words `capsem policy check` uses. Read-only; edits go through extension.py's gate."""

from __future__ import annotations

import os
from typing import Any

from capsem_vm.policy import Policy, PolicyError, Rule, load_kernel_policy, resolve_policy_path, user_policy_path
from capsem_vm.policy.model import ALLOW, DEFAULT_PORT, WEB_SCHEMES


def _sorted(values) -> list | None:
    return sorted(values) if values is not None else None


def rule_summary(rule: Rule) -> str:
    """'allow GET, HEAD https://pypi.org/simple/*' style: what the rule lets out (or stops)."""
    schemes = sorted(rule.schemes) if rule.schemes is not None else (
        ["http(s)", "ws(s)"] if rule.action == ALLOW else ["any scheme"])
    if rule.ports is not None:
        ports = ":" + ",".join(str(p) for p in sorted(rule.ports))
    elif rule.action == ALLOW and rule.schemes is not None and len(rule.schemes & WEB_SCHEMES) == len(rule.schemes):
        ports = ""  # the schemes' default ports, which the scheme already says
    else:
        ports = "" if rule.action == ALLOW else " (any port)"
    methods = ", ".join(sorted(rule.methods)) + " " if rule.methods else ""
    paths = (" paths " + ", ".join(rule.paths)) if rule.paths else ""
    return f"{rule.action} {methods}{'/'.join(schemes)}://{rule.host.text}{ports}{paths}"


def rule_json(rule: Rule, index: int) -> dict[str, Any]:
    return {
        "index": index,
        "name": rule.name,
        "action": rule.action,
        "host": rule.host.text,
        "schemes": _sorted(rule.schemes),
        "ports": _sorted(rule.ports),
        "methods": _sorted(rule.methods),
        "paths": list(rule.paths) if rule.paths else None,
        "addresses": [str(a) for a in rule.addresses],
        "reason": rule.reason,
        "origin": rule.origin,
        "builtin": rule.origin.startswith("built-in"),  # capsem's own (e.g. the DoH deny list), not the admin's
        "summary": rule_summary(rule),
    }


def policy_json(policy: Policy, path: str | None) -> dict[str, Any]:
    return {
        "source": str(path) if path else None,
        "description": (f"policy file {path}" if path else
                        f"built-in deny-all (no policy file configured, no {user_policy_path()})"),
        "default": "deny",
        "observe": bool(policy.observe),  # what the rules refuse goes out anyway, as would-deny
        "rules": [rule_json(r, i) for i, r in enumerate(policy.rules)],
        "credentials": [{"name": c.name, "hosts": [h.text for h in c.hosts], "header": c.header,
                         "query": c.query, "guest_env": c.guest_env}
                        for c in policy.credentials],  # never the secret
        "default_port": DEFAULT_PORT,
    }


def active_policy(explicit: str | None, guest_writable: list[str | os.PathLike] = ()) -> dict[str, Any]:
    """The policy a kernel with provisioner trait `policy = explicit` runs with, as JSON; an invalid
    policy is reported (the kernel would not have started with it), not raised."""
    path = resolve_policy_path(explicit or None)
    try:
        policy = load_kernel_policy(explicit or None, guest_writable)
    except PolicyError as exc:
        return {"source": str(path) if path else None, "error": str(exc), "rules": [], "credentials": []}
    return policy_json(policy, str(path) if path else None)


def kernel_policy(prov: Any, guest_writable: list[str | os.PathLike] = ()) -> dict[str, Any]:
    """The policy a capsem kernel runs with: the one its VM's egress loaded (exactly what the proxy
    enforces), else (no VM yet) the one its `policy` trait resolves to."""
    egress = getattr(getattr(getattr(prov, "kernel_vm", None), "vm", None), "egress", None)
    policy = getattr(egress, "policy", None)
    if isinstance(policy, Policy):
        return policy_json(policy, None if policy.source.startswith("<") else policy.source)
    return active_policy(getattr(prov, "policy", "") or "", guest_writable)

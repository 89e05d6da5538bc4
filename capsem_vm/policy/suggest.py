"""Policy rules suggested from refused requests: audit rows in, the smallest allow rules out (TOML).

Sans-IO: `suggest(rows, policy)` takes audit rows (dicts with the columns of docs/AUDIT.md) and the
policy they are judged against, and returns a Report; `render(report)` turns it into TOML text
whose rules are exactly `Report.rules()` (the text is valid TOML as a whole: everything else is a
comment). The CLI (`capsem policy suggest`, cli.py) reads the database and writes files.

What is suggested, and why so little:
- only refusals of the policy's default deny (code `default-deny`). Built-in protections (DoH,
  protected addresses, Host/SNI mismatch, ambiguous paths, ...) and the user's own deny rules are
  listed with the reason they are not suggested: a rule must never undo them.
- one exact host per rule, never `*` or a wildcard. Public IP literals get a loud warning;
  protected addresses (loopback, private, link-local, this host's own, ...) are printed commented
  out, with a louder one.
- methods and paths only from rows that saw them (HTTP, WebSocket). A refusal at DNS or connect
  time carries no method or path: from those, host, scheme and port only, and a comment saying so.
- paths: the exact path when one was seen under a first segment, else the longest common prefix
  of those seen (`/simple/*`): never broader than the first segment.
- names come from the guest: each must be a valid DNS name (IDNA labels that decode, no control
  characters; audit.py stores guest text escaped, so such names never validate) or an IP literal.
  Every value written is an escaped TOML string; comments are printable ASCII.
Each rule is checked against the policy it would be appended to: a request it claims to let
through must be allowed by the combined policy (an earlier rule of the file may still deny it:
first match wins), else it is listed as not suggested, with the rule that still decides it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from . import codes
from .addresses import protected_class
from .loader import PolicyError, parse_policy
from .match import HostPattern, IPNetwork, normalize_host, parse_ip
from .model import DEFAULT_PORT, DOH_ORIGIN, Policy
from .paths import canonicalize
from .presets import PRESETS

SUGGESTIBLE = frozenset({"default-deny"})
REASON = "suggested by capsem policy suggest from refused requests"
MAX_HOSTS = 500          # distinct hosts kept (a hostile guest can make up names at will)
MAX_PATHS = 1000         # distinct (method, path) per host, scheme and port
MAX_REFUSED = 200        # distinct "not suggested" entries kept
MAX_LINES = 12           # requests listed per rule in its comment
_METHOD = re.compile(r"[A-Z]{1,32}")
# scheme guessed for a port from a refused connection (no byte of the request was seen)
PORT_SCHEME = {80: "http", 8080: "http", 8000: "http", 443: "https", 8443: "https"}
# names that usually resolve to addresses of the local network
_LOCAL_SUFFIXES = ("localhost", "local", "internal", "lan", "home.arpa", "intranet", "corp", "test",
                   "invalid", "localdomain")

# why a refusal is not suggested, by code (the code's own description otherwise)
WHY_NOT = {
    "rule-deny": "a deny rule of your policy refuses it; an allow rule appended after it would never be "
                 "reached (first match wins): change that rule yourself if you mean to allow this",
    "doh": "DNS-over-HTTPS is refused by a built-in protection (names must resolve through capsem's DNS); "
           "no rule should undo it",
    "address": "SSRF protection: the destination is a protected address (loopback, private, link-local, "
               "metadata, this host's own, ...); only a rule naming it in `addresses` can reach it, and "
               "suggest never writes one",
    "host-mismatch": "the names the request carried disagree (Host, SNI, CONNECT target): a built-in "
                     "protection against fronting and smuggling",
    "sni-mismatch": "the TLS SNI disagreed with the destination: a built-in protection",
    "upgrade-mismatch": "a protocol switch the request was not judged for: a built-in protection",
    "ambiguous-path": "the path has a spelling servers read differently: no allow rule with paths may match it",
    "invalid-host": "not a valid host name or address",
    "invalid-url": "the request target could not be judged (scheme, port or form)",
}


@dataclass(frozen=True)
class Seen:
    """One kind of refused event a rule accounts for (a comment line), and how to re-check it."""
    kind: str              # dns | connect | http | websocket | tcp
    host: str
    port: int | None = None
    scheme: str | None = None
    method: str | None = None
    path: str | None = None

    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path or ''}"

    def text(self) -> str:
        if self.kind == "dns":
            return f"DNS lookup of {self.host} (refused before any connection)"
        if self.kind == "connect":
            return f"connection to {self.host}:{self.port} (refused before any request)"
        if self.kind == "tcp":
            return f"TCP stream {self.url()}"
        return f"{self.method} {self.url()}"


@dataclass
class Suggestion:
    host: str
    rule: dict                      # the TOML keys of one [[rule]], in order
    seen: dict = field(default_factory=dict)   # Seen -> count
    notes: list = field(default_factory=list)  # comment lines above the rule
    active: bool = True             # False: printed commented out (a protected address)


@dataclass
class Refused:
    what: str
    code: str
    why: str
    count: int = 0


@dataclass
class Report:
    suggestions: list = field(default_factory=list)
    refused: dict = field(default_factory=dict)    # (what, code) -> Refused
    rows: int = 0
    events: int = 0
    already_allowed: int = 0
    folded: int = 0            # refusals only counted in audit-rate rows (no host, no path)
    dropped: int = 0           # events past MAX_HOSTS / MAX_PATHS

    def rules(self) -> list[dict]:
        """The rules the rendered text declares (active suggestions), in order."""
        return [s.rule for s in self.suggestions if s.active]

    def refuse(self, what: str, code: str, why: str, count: int) -> None:
        key = (what, code)
        r = self.refused.get(key)
        if r is None:
            if len(self.refused) >= MAX_REFUSED:
                self.dropped += count
                return
            r = self.refused[key] = Refused(what, code, why)
        r.count += count


# --- validation of guest-chosen text ---------------------------------------------------------------

def valid_host(text) -> str | None:
    """The canonical form of a host a rule may name: an IP literal, or a DNS name whose labels are
    letters, digits, '-' and '_' and whose IDNA labels (xn--) decode. None otherwise."""
    if not isinstance(text, str) or not text.isprintable():  # controls, bidi marks, separators
        return None
    name = normalize_host(text)
    if name is None or not name.isascii():
        return None
    if parse_ip(name) is None:
        for label in name.split("."):
            if label.startswith("xn--"):
                try:
                    label.encode("ascii").decode("idna")
                except (UnicodeError, ValueError):
                    return None
    return name


def _method(text) -> str | None:
    m = (text or "").upper() if isinstance(text, str) else ""
    return m if _METHOD.fullmatch(m) else None


def _count(row: Mapping) -> int:
    c = row.get("count")
    return c if isinstance(c, int) and not isinstance(c, bool) and c > 0 else 1


def _port(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536 else None


def _what(row: Mapping) -> str:
    kind = row.get("kind") or "?"
    target = row.get("url") or row.get("host") or "?"
    method = row.get("method") if kind in ("http", "websocket") else None
    return f"{kind} {method + ' ' if isinstance(method, str) else ''}{target}"[:300]


# --- the event a row stands for ------------------------------------------------------------------

def _event(row: Mapping, report: Report, n: int) -> Seen | None:
    """The Seen of a default-deny row, or None (then refused in the report, with why)."""
    kind = row.get("kind")
    host = valid_host(row.get("host"))
    if host is None:
        report.refuse(_what(row), "invalid-host", "the recorded host is not a valid DNS name or IP address "
                      "(control characters, quotes, bad IDNA, ...)", n)
        return None
    if kind == "dns":
        return Seen("dns", host)
    if kind == "connect":
        port = _port(row.get("port"))
        if port is None:
            report.refuse(_what(row), "invalid-url", "no valid port recorded", n)
            return None
        return Seen("connect", host, port)
    if kind not in ("http", "websocket", "tcp"):
        report.refuse(_what(row), "invalid-url", f"unknown kind of row {str(kind)[:20]!r}", n)
        return None
    url = row.get("url")
    if not isinstance(url, str) or not url.isprintable() or " " in url:
        # why: urlsplit drops tabs and newlines silently: the rule would name a path never sent
        report.refuse(_what(row), "invalid-url", "the recorded URL has control characters or spaces", n)
        return None
    try:
        parts = urlsplit(url)
        scheme, url_host, port = parts.scheme.lower(), parts.hostname, parts.port
    except (ValueError, TypeError):
        report.refuse(_what(row), "invalid-url", "the recorded URL cannot be parsed", n)
        return None
    allowed_schemes = ("tcp",) if kind == "tcp" else ("ws", "wss") if kind == "websocket" else ("http", "https")
    if scheme not in allowed_schemes or valid_host(url_host or "") != host:
        report.refuse(_what(row), "invalid-url", "the recorded URL does not name the recorded host", n)
        return None
    port = port or DEFAULT_PORT.get(scheme)
    if _port(port) is None:
        report.refuse(_what(row), "invalid-url", "no valid port recorded", n)
        return None
    if kind == "tcp":
        return Seen("tcp", host, port, "tcp")
    method = _method(row.get("method"))
    canonical = canonicalize(parts.path or "/")
    if method is None:
        report.refuse(_what(row), "invalid-url", "the recorded method is not an HTTP method name", n)
        return None
    if canonical.ambiguous:
        report.refuse(_what(row), "ambiguous-path", f"the path has a spelling servers read differently "
                      f"({canonical.ambiguous}): no allow rule with paths may match it", n)
        return None
    return Seen(kind, host, port, scheme, method, canonical.path)


def _already_allowed(policy: Policy, e: Seen) -> bool:
    if e.kind == "dns":
        return policy.decide_connect(e.host).allowed
    if e.kind == "connect":
        return policy.decide_connect(e.host, e.port).allowed
    return policy.decide(e.method or "GET", e.url()).allowed


# --- paths ---------------------------------------------------------------------------------------

def glob_literal(path: str) -> str:
    """`path` as a `paths` glob matching only itself (fnmatch metacharacters in brackets)."""
    return re.sub(r"[*?\[\]]", lambda m: f"[{m.group()}]", path)


def path_globs(paths: Iterable[str]) -> dict[str, list[str]]:
    """glob -> the paths it stands for. Paths are grouped by their first segment: a group of one
    is its exact path; a larger group is its longest common directory prefix + `/*` (at least the
    first segment), plus the exact prefix itself if it was seen."""
    groups: dict[str, list[str]] = {}
    for p in sorted(set(paths)):
        groups.setdefault(p.split("/")[1] if p.count("/") >= 2 else p, []).append(p)
    out: dict[str, list[str]] = {}
    for members in groups.values():
        if len(members) == 1:
            out.setdefault(glob_literal(members[0]), []).append(members[0])
            continue
        split = [m.split("/")[1:] for m in members]
        common: list[str] = []
        for segs in zip(*[s[:-1] for s in split]):  # directories only: the last segment is a name
            if len(set(segs)) != 1:
                break
            common.append(segs[0])
        prefix = "/" + "/".join(common[:] or [split[0][0]])
        glob = glob_literal(prefix) + "/*"
        for m in members:
            key = glob if m.startswith(prefix + "/") else glob_literal(m)
            out.setdefault(key, []).append(m)
    return out


# --- building rules ------------------------------------------------------------------------------

def rule_name(host: str) -> str:
    """`suggest-<host>` within the loader's 64 characters (room left for a `-N` suffix)."""
    base = f"suggest-{host}"
    if len(base) > 52:
        base = f"suggest-{host[:32]}-{hashlib.sha256(host.encode()).hexdigest()[:8]}"
    return base


def _rule(host: str, scheme: str, port: int, methods=None, paths=None) -> dict:
    rule = {"name": rule_name(host), "host": host, "scheme": scheme, "port": port}
    if methods:
        rule["methods"] = sorted(methods)
    if paths:
        rule["paths"] = list(paths)
    rule.update(action="allow", reason=REASON)
    return rule


def _host_notes(host: str, own: tuple[IPNetwork, ...]) -> tuple[list[str], bool]:
    """(warning comment lines, active) for a host."""
    ip = parse_ip(host)
    if ip is not None:
        cls = protected_class(ip, own)
        if cls is not None:
            return ([f"WARNING: {host} is a protected address ({cls}). Reaching it from the guest is what "
                     "SSRF attacks do (cloud metadata, the host's own services, your LAN).",
                     "Left commented out: uncomment only if you are sure, and add `addresses = "
                     f"[\"{host}\"]`."], False)
        return ([f"WARNING: {host} is an IP literal: prefer the host's name; whoever holds this address "
                 "later gets the traffic."], True)
    notes = []
    presets = presets_for(host)
    if presets:
        notes.append("Preset " + " or ".join(f"`include = \"{p}\"`" for p in presets)
                     + " covers this host with the rules its client needs: consider that instead.")
    labels = host.split(".")
    if len(labels) == 1 or any(host == s or host.endswith("." + s) for s in _LOCAL_SUFFIXES):
        notes.append(f"WARNING: {host} looks like a local network name; the proxy still refuses private "
                     "addresses unless a rule names them.")
    return notes, True


def presets_for(host: str) -> list[str]:
    """The presets with an allow rule for `host` (by its host pattern)."""
    return [name for name, rules in PRESETS.items()
            if any(r["action"] == "allow" and HostPattern(r["host"]).matches(host) for r in rules)]


class _Host:
    def __init__(self):
        self.dns = 0
        self.connect: dict[int, int] = {}                    # port -> count
        self.requests: dict[tuple, dict] = {}                # (kind, scheme, port) -> {(method, path): count}
        self.tcp: dict[int, int] = {}


def _build(host: str, h: _Host, own: tuple[IPNetwork, ...]) -> list[Suggestion]:
    notes, active = _host_notes(host, own)
    out: list[Suggestion] = []

    def new(rule: dict) -> Suggestion:
        s = Suggestion(host, rule, notes=list(notes), active=active)
        out.append(s)
        return s

    covered_ports = set()
    for (kind, scheme, port), seen in sorted(h.requests.items()):
        covered_ports.add(port)
        globs = path_globs(path for _, path in seen)
        by_methods: dict[frozenset, list[str]] = {}
        for glob, members in globs.items():
            methods = frozenset(m for (m, p) in seen if p in members)
            by_methods.setdefault(methods, []).append(glob)
        for methods, globs_ in sorted(by_methods.items(), key=lambda kv: sorted(kv[0])):
            s = new(_rule(host, scheme, port, methods, globs_))
            for (m, p), c in seen.items():
                if m in methods and any(p in globs[g] for g in globs_):
                    s.seen[Seen(kind, host, port, scheme, m, p)] = c
    for port, c in sorted(h.tcp.items()):
        covered_ports.add(port)
        s = new(_rule(host, "tcp", port))
        s.seen[Seen("tcp", host, port, "tcp")] = c
    for port, c in sorted(h.connect.items()):
        if port in covered_ports:  # the request rules of that port cover it
            next(s for s in out if s.rule["port"] == port).seen[Seen("connect", host, port)] = c
            continue
        scheme = PORT_SCHEME.get(port, "https")
        s = new(_rule(host, scheme, port))
        s.seen[Seen("connect", host, port)] = c
        s.notes.append("Only connections were seen (refused before any request): this allows any method and "
                       "path. For narrower rules, learn the requests in observe mode (trusted code only: "
                       "[settings] observe = true, or capsem kernel install --observe).")
        if port not in PORT_SCHEME:
            s.notes.append(f"The scheme is a guess for port {port}: use \"http\" for plain HTTP or \"tcp\" "
                           "(raw TCP: ssh, databases) if the client speaks that.")
    if h.dns:
        if not out:
            s = new(_rule(host, "https", 443))
            s.notes.append("Only DNS lookups were seen (refused before any connection): HTTPS on port 443 is "
                           "assumed, any method and path. After applying, a refusal on another port or scheme "
                           "shows up here again; for narrower rules, observe mode (trusted code only: "
                           "[settings] observe = true).")
        out[0].seen[Seen("dns", host)] = h.dns
    return out


def suggest(rows: Iterable[Mapping], policy: Policy | None = None, *, own: tuple[IPNetwork, ...] = (),
            base_text: str = "") -> Report:
    """The rules that would have let the refused rows through. `policy`: the policy they are judged
    against now (requests it already allows are skipped); `base_text`: the policy file text the
    rules would be appended to (each rule is checked against the combined policy); `own`: this
    host's own addresses (protected). Total: hostile rows end up in Report.refused."""
    report = Report()
    hosts: dict[str, _Host] = {}
    for row in rows:
        report.rows += 1
        # would-deny: what observe mode let through; it carries the code the refusal would have had
        if not isinstance(row, Mapping) or row.get("decision") not in ("deny", "would-deny"):
            continue
        n = _count(row)
        code = row.get("code") or ""
        if code == "audit-rate":
            report.folded += n
            continue
        if row.get("kind") == "note":
            continue
        report.events += n
        if code not in SUGGESTIBLE:
            why = WHY_NOT.get(code) or (f"a built-in protection: {codes.CODES[code]}" if codes.known(code)
                                        else "unknown reason code")
            if code == "rule-deny" and isinstance(row.get("rule"), str):
                why = f"rule {row['rule'][:64]!r}: " + why
            report.refuse(_what(row), code if codes.known(code) else "unknown", why, n)
            continue
        e = _event(row, report, n)
        if e is None:
            continue
        if policy is not None and _already_allowed(policy, e):
            report.already_allowed += n
            continue
        h = hosts.get(e.host)
        if h is None:
            if len(hosts) >= MAX_HOSTS:
                report.dropped += n
                continue
            h = hosts[e.host] = _Host()
        if e.kind == "dns":
            h.dns += n
        elif e.kind == "connect":
            h.connect[e.port] = h.connect.get(e.port, 0) + n
        elif e.kind == "tcp":
            h.tcp[e.port] = h.tcp.get(e.port, 0) + n
        else:
            seen = h.requests.setdefault((e.kind, e.scheme, e.port), {})
            key = (e.method, e.path)
            if key not in seen and len(seen) >= MAX_PATHS:
                report.dropped += n
                continue
            seen[key] = seen.get(key, 0) + n
    taken = {r.name for r in policy.rules} if policy is not None else set()
    for _ in range(3):  # a rebuild only drops what an earlier rule shadows: once is enough, twice is a check
        report.suggestions = [s for host in sorted(hosts) for s in _build(host, hosts[host], own)]
        _unique_names(report.suggestions, taken)
        if not _verify(report, base_text, hosts):
            break
    return report


def _unique_names(suggestions: list, taken: set[str]) -> None:
    """Rename suggestions whose name the policy already uses (an earlier --apply): the audit log and
    403s name the deciding rule, so one name should mean one rule."""
    for s in suggestions:
        base = rule_name(s.host)
        name, i = base, 1
        while name in taken:
            i += 1
            name = f"{base}-{i}"
        s.rule["name"] = name
        taken.add(name)


def _verify(report: Report, base_text: str, hosts: dict) -> bool:
    """Check the rules against the combined policy (base + rules): an earlier rule of the file may
    still deny a request (first match wins). Such requests are moved to report.refused and taken
    out of `hosts`; True if any was (the rules must then be built again, narrower)."""
    if not report.rules():
        return False
    try:
        combined = parse_policy(append_text(base_text, render_rules(report)), "<policy + suggestions>")
    except PolicyError as exc:  # the base does not parse: nothing can be checked, so nothing is suggested
        for s in report.suggestions:
            for e, c in s.seen.items():
                report.refuse(e.text(), "default-deny", f"the policy file is invalid ({exc})", c)
        report.suggestions = []
        hosts.clear()
        return False
    changed = False
    for s in report.suggestions:
        if not s.active:
            continue
        for e, c in s.seen.items():
            if _already_allowed(combined, e):
                continue
            d = combined.decide(e.method or "GET", e.url()) if e.kind not in ("dns", "connect") else (
                combined.decide_connect(e.host, e.port if e.kind == "connect" else None))
            report.refuse(e.text(), d.code, f"still refused by rule {d.rule!r} of the policy before the "
                          "suggestion (first match wins)", c)
            h = hosts[e.host]
            if e.kind == "dns":
                h.dns = 0
            elif e.kind == "connect":
                h.connect.pop(e.port, None)
            elif e.kind == "tcp":
                h.tcp.pop(e.port, None)
            else:
                h.requests[(e.kind, e.scheme, e.port)].pop((e.method, e.path), None)
            changed = True
    for h in hosts.values():
        h.requests = {k: v for k, v in h.requests.items() if v}
    return changed


# --- TOML ----------------------------------------------------------------------------------------

def toml_string(text: str) -> str:
    """A TOML basic string for `text`: quotes, backslashes, controls and non-ASCII escaped."""
    out = []
    for ch in text:
        o = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= o < 0x7F:
            out.append(ch)
        elif 0xD800 <= o <= 0xDFFF:
            raise ValueError("lone surrogates cannot be written to TOML")
        else:
            out.append(f"\\u{o:04X}" if o <= 0xFFFF else f"\\U{o:08X}")
    return '"' + "".join(out) + '"'


def comment(text: str) -> str:
    """One TOML comment line: printable ASCII only, so nothing a guest chose can end the comment."""
    safe = "".join(ch if 0x20 <= ord(ch) < 0x7F else f"\\u{ord(ch):04x}" for ch in str(text))
    return ("# " + safe).rstrip()


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return toml_string(v)
    return "[" + ", ".join(_value(x) for x in v) + "]"


def rule_toml(rule: dict) -> list[str]:
    return ["[[rule]]"] + [f"{k} = {_value(v)}" for k, v in rule.items()]


def render_rules(report: Report) -> str:
    """Only the active rules (no comments): what --apply's check parses."""
    return "".join("\n" + "\n".join(rule_toml(s.rule)) + "\n" for s in report.suggestions if s.active)


def append_text(base: str, addition: str) -> str:
    """`base` with `addition` appended on a line of its own (a base ending in a comment stays one)."""
    if base and not base.endswith("\n"):
        base += "\n"
    return base + addition


def rule_key(rule) -> tuple:
    """A rule (a suggested dict, or a parsed model.Rule) as comparable data."""
    if isinstance(rule, dict):
        s = rule.get("scheme")
        p = rule.get("port")
        return (rule["name"], rule["action"], rule["host"], frozenset([s] if isinstance(s, str) else s or ()) or None,
                frozenset([p] if isinstance(p, int) else p or ()) or None, frozenset(rule.get("methods") or ()) or None,
                tuple(rule.get("paths") or ()) or None, rule.get("reason"), ())
    return (rule.name, rule.action, rule.host.text, rule.schemes, rule.ports, rule.methods, rule.paths, rule.reason,
            rule.addresses)


def user_rules(policy: Policy) -> list:
    """The policy's rules without the built-in DoH ones."""
    return [r for r in policy.rules if r.origin != DOH_ORIGIN]


def render(report: Report, *, source: str = "", for_apply: bool = False) -> str:
    """The report as TOML: the suggested rules, with comments; valid TOML whose rules are exactly
    report.rules(). `for_apply`: only the active suggestions (what --apply appends)."""
    if for_apply:
        report = Report(suggestions=[s for s in report.suggestions if s.active], events=report.events,
                        rows=report.rows)
    if for_apply:
        lines = [comment(f"Added by `capsem policy suggest --apply` from refused requests"
                         + (f" of {source}" if source else "") + ".")]
    else:
        lines = [comment(f"capsem policy suggest: {report.events} refused event(s) in {report.rows} audit row(s)"
                         + (f" of {source}" if source else ""))]
        if report.already_allowed:
            lines.append(comment(f"{report.already_allowed} of them are allowed by the current policy already."))
        if report.folded:
            lines.append(comment(f"{report.folded} more were only counted (audit rate bound: no host or path "
                                 "recorded); run the workload again to see them."))
        if report.dropped:
            lines.append(comment(f"{report.dropped} more were left out (too many distinct hosts or paths)."))
        lines.append(comment("Nothing to suggest.") if not report.suggestions else comment(
            "Review every rule: each allows only what is listed above it. Append with "
            "`capsem policy suggest ... --apply FILE`."))
    for s in report.suggestions:
        lines += ["", comment(f"---- {s.host} " + "-" * max(0, 60 - len(s.host)))]
        lines += [comment(n) for n in s.notes]
        lines.append(comment("Would let through (refused, with how often):"))
        items = sorted(s.seen.items(), key=lambda kv: (-kv[1], kv[0].text()))
        for e, c in items[:MAX_LINES]:
            lines.append(comment(f"  {e.text()}  x{c}"))
        if len(items) > MAX_LINES:
            lines.append(comment(f"  ... and {len(items) - MAX_LINES} more ({sum(c for _, c in items[MAX_LINES:])} "
                                 "events)"))
        body = rule_toml(s.rule)
        lines += body if s.active else [comment(b) for b in body]
    if report.refused and not for_apply:
        lines += ["", comment("Not suggested (no rule should be added for these):")]
        for r in sorted(report.refused.values(), key=lambda r: (-r.count, r.code, r.what)):
            lines.append(comment(f"  {r.what}  x{r.count}  [{r.code}] {r.why}"))
    return "\n".join(lines) + "\n"

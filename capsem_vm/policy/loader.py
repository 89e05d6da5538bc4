"""TOML policy files -> Policy, with errors that name the file and line.

File format (all tables optional; an empty file denies everything):

    version = 1

    [settings]
    allow_doh = false            # true removes the implicit DNS-over-HTTPS deny rules
    observe = false              # true: OBSERVE MODE, for trusted code only. What the rules refuse
                                 # (default-deny, rule-deny) goes out and is audited "would-deny";
                                 # built-in protections (DoH, protected addresses, Host/SNI
                                 # agreement, ambiguous paths, limits) still refuse, and no
                                 # credential is injected into a would-deny request

    [[rule]]
    name = "github-api"          # shown in 403s, X-Capsem-Policy and the audit log
    host = "api.github.com"      # exact name, "*.suffix", "*", IP literal or CIDR
    scheme = "https"             # or ["http", "https"]; http|https|ws|wss|tcp
    port = 443                   # or [443, 8443]
    methods = ["GET", "POST"]
    paths = ["/repos/*"]         # fnmatch globs on the path (no query)
    addresses = ["10.0.0.0/8"]   # private/loopback addresses this rule may reach after resolving
    action = "allow"             # or "deny"
    reason = "GitHub API for the notebook"

    [[rule]]
    include = "pypi"             # splice a preset's rules here (see capsem_vm.policy.presets)

    [[credential]]
    name = "github"
    hosts = ["api.github.com"]
    env = "GITHUB_TOKEN"         # or file = "~/.config/capsem/github-token" (absolute or ~/)
    header = "Authorization"     # where the secret goes: always set this header ...
    format = "Bearer {value}"    # ... to this ({value} is the secret)
    query = "api_key"            # and/or: this query parameter, when the guest sent the placeholder as its value
    guest_env = "GITHUB_TOKEN"   # optional: the guest gets this variable = the placeholder
    placeholder = "capsem-placeholder-github"   # optional; default derived from name

A credential must name at least one place (`header`, `query`). Only HTTPS/WSS requests to its
hosts get it, and only there: a placeholder in any other header, cookie, the path, another query
parameter or the body goes out as the guest wrote it. Responses are scrubbed of the secret. A
`file` must not be inside a folder shared with the VM, a symlink, or writable (it or a directory
above it) by anyone but you or root: the kernel does not start otherwise.

Paths. Every request path is put into one canonical form before rules see it (RFC 3986 section
6: escapes of unreserved characters decoded, other escapes uppercased, dot segments removed), and
the proxy sends that form upstream: the server receives the path that was judged. Allow rules
match the canonical path exactly (case-sensitive). Deny rules also match a loose reading of it
(case-insensitive, every escape decoded, `;params` cut, repeated slashes collapsed), so
`/%61dmin`, `//ADMIN`, `/admin;x` and `/x/..;/admin` are all `/admin` to a deny rule. A path
servers may still read differently (encoded '/' or '\\', `%25`, `;`, backslashes, control
characters, malformed or non-UTF-8 escapes) never matches an allow rule with `paths` and always
matches a deny rule with `paths` ("ambiguous-path"); with the built-in DoH rules (a deny rule with
paths for every host) such paths are refused on every host unless `allow_doh = true`. The one
exception is npm's scoped-package spelling, exactly `/@scope%2Fname`: a deny rule matches it when
its globs match either of its two readings (as sent, or `/@scope/name`).

Addresses. Numeric hosts mean the address inet_aton reads (`0x7f.1`, `0177.0.0.1`,
`2130706433` are 127.0.0.1), IPv4-mapped IPv6 is the IPv4 address. After a name resolves,
loopback, private, link-local, CGNAT, multicast, reserved, NAT64, 6to4, Teredo, IPv4-compatible,
SIIT and site-local addresses are refused unless the deciding rule names the address (its host is
that IP/CIDR, or `addresses` contains it); this host's own addresses (other than loopback) only
when named one by one (a single address, not a network around it). A deny rule whose host is an
IP/CIDR also refuses names that resolve into it and IPv6 literals that carry such an IPv4 address.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Iterator

from ..errors import CapsemError
from .match import HostPattern
from .model import ALLOW, DENY, DOH_ORIGIN, SCHEMES, Credential, Policy, Rule, ip_network
from .presets import DOH_RULES, PRESETS

HINT = "see the policy file format in `capsem policy check --help` (capsem_vm/policy/loader.py)"
MAX_POLICY_BYTES = 1 << 20
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_HEADER = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
SETTINGS = ("allow_doh", "observe")  # [settings] keys, all booleans, all false by default
_QUERY = re.compile(r"^[A-Za-z0-9_.~-]{1,64}$")  # unreserved characters: one spelling on every server


class PolicyError(CapsemError):
    """A policy file cannot be read or is invalid. `line` is 1-based when known."""

    def __init__(self, message: str, *, source: str = "<policy>", line: int | None = None, hint: str | None = HINT):
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {message}", hint)
        self.source = source
        self.line = line


class _Lines:
    """Maps (table, index, key) to the line that defines it. tomllib keeps no positions, so we scan
    the text for table headers and `key =` lines; good enough to point at the offending line."""

    _ARRAY = re.compile(r"^\s*\[\[\s*([A-Za-z0-9_.-]+)\s*\]\]")
    _TABLE = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]")
    _KEY = re.compile(r'^\s*("?)([A-Za-z0-9_-]+)\1\s*=')

    def __init__(self, text: str):
        self.pos: dict[tuple, int] = {}
        counts: dict[str, int] = {}
        current: tuple = (None, None)
        for n, line in enumerate(text.splitlines(), 1):
            if m := self._ARRAY.match(line):
                name = m.group(1)
                current = (name, counts.get(name, 0))
                counts[name] = current[1] + 1
                self.pos.setdefault((*current, None), n)
            elif m := self._TABLE.match(line):
                current = (m.group(1), None)
                self.pos.setdefault((*current, None), n)
            elif m := self._KEY.match(line):
                self.pos.setdefault((*current, m.group(2)), n)

    def line(self, table: str | None, index: int | None, key: str | None = None) -> int | None:
        return self.pos.get((table, index, key)) or self.pos.get((table, index, None))


class _Ctx:
    def __init__(self, source: str, lines: _Lines | None, table: str | None, index: int | None, origin: str):
        self.source, self.lines, self.table, self.index, self.origin = source, lines, table, index, origin

    def fail(self, message: str, key: str | None = None):
        line = self.lines.line(self.table, self.index, key) if self.lines else None
        where = f"[[{self.table}]] #{self.index + 1}" if self.index is not None else (self.table or "top level")
        if self.lines is None:
            where = self.origin
        raise PolicyError(f"{where}: {message}", source=self.source, line=line)

    def only_keys(self, d: dict, allowed: set[str], what: str) -> None:
        for key in d:
            if key not in allowed:
                self.fail(f"unknown key {key!r} in {what} (allowed: {', '.join(sorted(allowed))})", key)

    def here(self, key: str | None = None) -> str:
        if self.lines is None:
            return self.origin
        line = self.lines.line(self.table, self.index, key)
        return f"{self.source}:{line}" if line else self.source


def _tables(data: dict, key: str, top: _Ctx) -> Iterator[tuple[_Ctx, dict]]:
    """The [[key]] tables of a policy, each with the context its errors name."""
    raw = data.get(key, [])
    if not isinstance(raw, list):
        top.fail(f"'{key}' must be an array of tables: write [[{key}]]", key)
    for i, d in enumerate(raw):
        ctx = _Ctx(top.source, top.lines, key, i, top.origin)
        if not isinstance(d, dict):
            ctx.fail(f"each {key} must be a table")
        yield ctx, d


def _str(ctx: _Ctx, d: dict, key: str, *, required=False, pattern: re.Pattern | None = None, max_len=1024):
    v = d.get(key)
    if v is None:
        if required:
            ctx.fail(f"missing required key {key!r}")
        return None
    if not isinstance(v, str) or not v or len(v) > max_len or "\x00" in v:
        ctx.fail(f"{key!r} must be a non-empty string of at most {max_len} characters", key)
    if pattern and not pattern.match(v):
        ctx.fail(f"{key!r} has an invalid value {v!r}", key)
    return v


def _str_list(ctx: _Ctx, d: dict, key: str, *, max_items=256) -> list[str] | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v or len(v) > max_items or not all(isinstance(x, str) and x for x in v):
        ctx.fail(f"{key!r} must be a string or a non-empty list of strings", key)
    return v


def _rule(ctx: _Ctx, d: dict) -> Rule:
    # 'include' only alone, which parse_policy handles before a rule gets here
    ctx.only_keys(d, {"name", "host", "scheme", "port", "methods", "paths", "action", "reason", "addresses",
                      "include"}, "a rule")
    name = _str(ctx, d, "name", required=True, pattern=_NAME)
    action = _str(ctx, d, "action", required=True)
    if action not in (ALLOW, DENY):
        ctx.fail(f"'action' must be \"allow\" or \"deny\", not {action!r}", "action")
    host_text = _str(ctx, d, "host", required=True, max_len=260)
    try:
        host = HostPattern(host_text)
    except ValueError as exc:
        ctx.fail(str(exc), "host")
    schemes = _str_list(ctx, d, "scheme")
    if schemes is not None:
        schemes = [s.lower() for s in schemes]
        for s in schemes:
            if s not in SCHEMES:
                ctx.fail(f"unknown scheme {s!r} (use one of {', '.join(SCHEMES)})", "scheme")
    ports = d.get("port")
    if ports is not None:
        if isinstance(ports, int) and not isinstance(ports, bool):
            ports = [ports]
        if (not isinstance(ports, list) or not ports
                or not all(isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in ports)):
            ctx.fail("'port' must be a port number 1-65535 or a list of them", "port")
    if schemes and "tcp" in schemes and ports is None and action == ALLOW:
        ctx.fail("a rule allowing scheme \"tcp\" needs an explicit 'port'", "scheme")
    methods = _str_list(ctx, d, "methods")
    if methods is not None:
        methods = [m.upper() for m in methods]
        if not all(m == "*" or re.fullmatch(r"[A-Z]{1,32}", m) for m in methods):
            ctx.fail("'methods' must be HTTP method names like \"GET\" (or \"*\")", "methods")
    paths = _str_list(ctx, d, "paths")
    if paths is not None and not all(p.startswith(("/", "*")) for p in paths):
        ctx.fail("each of 'paths' must start with '/' or '*'", "paths")
    addresses = []
    for a in _str_list(ctx, d, "addresses") or []:
        try:
            addresses.append(ip_network(a))
        except ValueError:
            ctx.fail(f"'addresses' entry {a!r} is not an IP address or network", "addresses")
    reason = _str(ctx, d, "reason") or (f"allowed by rule {name}" if action == ALLOW else f"denied by rule {name}")
    return Rule(
        name=name, action=action, host=host,
        schemes=frozenset(schemes) if schemes else None,
        ports=frozenset(ports) if ports else None,
        methods=frozenset(methods) if methods else None,
        paths=tuple(paths) if paths else None,
        reason=reason, addresses=tuple(addresses), origin=ctx.here(),
    )


def _credential(ctx: _Ctx, d: dict) -> Credential:
    ctx.only_keys(d, {"name", "hosts", "env", "file", "header", "format", "guest_env", "placeholder", "query"},
                  "a credential")
    name = _str(ctx, d, "name", required=True, pattern=_NAME)
    hosts = _str_list(ctx, d, "hosts")
    if not hosts:
        ctx.fail("a credential needs 'hosts' (where it may be sent)", "hosts")
    patterns = []
    for h in hosts:
        try:
            patterns.append(HostPattern(h))
        except ValueError as exc:
            ctx.fail(str(exc), "hosts")
    if any(p.kind == "any" for p in patterns):
        ctx.fail("a credential cannot be sent to every host ('*')", "hosts")
    env = _str(ctx, d, "env", pattern=_ENV)
    file = _str(ctx, d, "file")
    if bool(env) == bool(file):
        ctx.fail("a credential needs exactly one of 'env' (host env var) or 'file'", "env" if env else None)
    if file and not file.startswith(("/", "~/")):
        ctx.fail(f"'file' must be an absolute path (or start with ~/), not {file!r}", "file")
    header = _str(ctx, d, "header", pattern=_HEADER)
    query = _str(ctx, d, "query", pattern=_QUERY)
    if not header and not query:
        ctx.fail("a credential must say where the secret goes: 'header' (set to 'format') and/or 'query' "
                 "(the query parameter whose placeholder value it replaces)", "name")
    if d.get("format") is not None and not header:
        ctx.fail("'format' applies to 'header': add 'header' or remove 'format'", "format")
    fmt = _str(ctx, d, "format") or "{value}"
    if "{value}" not in fmt or any(c in fmt for c in "\r\n"):
        ctx.fail("'format' must contain {value} and no line breaks", "format")
    guest_env = _str(ctx, d, "guest_env", pattern=_ENV)
    placeholder = _str(ctx, d, "placeholder", pattern=re.compile(r"^[A-Za-z0-9_.-]{8,128}$"))
    placeholder = placeholder or f"capsem-placeholder-{name}"
    return Credential(name=name, hosts=tuple(patterns), placeholder=placeholder, env=env, file=file,
                      header=header, format=fmt, guest_env=guest_env, origin=ctx.here(), query=query)


def _preset_rules(name: str) -> list[Rule]:
    return [_rule(_Ctx(f"preset {name}", None, None, None, f"preset {name}"), dict(d)) for d in PRESETS[name]]


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Parse policy TOML text. Raises PolicyError with file:line."""
    if len(text.encode()) > MAX_POLICY_BYTES:
        raise PolicyError(f"policy is larger than {MAX_POLICY_BYTES} bytes", source=source)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise PolicyError(f"invalid TOML: {exc}", source=source, line=int(m.group(1)) if m else None) from None
    lines = _Lines(text)
    top = _Ctx(source, lines, None, None, source)
    for key in data:
        if key not in ("version", "settings", "rule", "credential"):
            top.fail(f"unknown top-level key {key!r} (allowed: version, settings, [[rule]], [[credential]])", key)
    if data.get("version", 1) != 1:
        top.fail("unsupported 'version' (this capsem understands version = 1)", "version")
    settings = data.get("settings", {})
    sctx = _Ctx(source, lines, "settings", None, source)
    if not isinstance(settings, dict):
        top.fail("'settings' must be a table", "settings")
    for key, v in settings.items():
        if key not in SETTINGS:
            sctx.fail(f"unknown setting {key!r} (allowed: {', '.join(SETTINGS)})", key)
        if not isinstance(v, bool):
            sctx.fail(f"{key!r} must be true or false", key)

    rules: list[Rule] = []
    if not settings.get("allow_doh", False):
        doh_ctx = _Ctx("built-in DoH rules", None, None, None, DOH_ORIGIN)
        rules += [_rule(doh_ctx, dict(d)) for d in DOH_RULES]
    for ctx, d in _tables(data, "rule", top):
        if "include" in d:
            if len(d) != 1:
                ctx.fail("a rule with 'include' must have no other keys", next(k for k in d if k != "include"))
            name = d["include"]
            if not isinstance(name, str) or name not in PRESETS:
                ctx.fail(f"unknown preset {name!r} (known: {', '.join(sorted(PRESETS))})", "include")
            rules += _preset_rules(name)
        else:
            rules.append(_rule(ctx, d))
    creds: list[Credential] = []
    for ctx, d in _tables(data, "credential", top):
        cred = _credential(ctx, d)
        if any(c.name == cred.name for c in creds):
            ctx.fail(f"duplicate credential name {cred.name!r}", "name")
        creds.append(cred)
    return Policy(rules=tuple(rules), credentials=tuple(creds), source=source, text=text,
                  observe=settings.get("observe", False))


def load_policy(path: str | Path) -> Policy:
    """Read and parse a policy file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"cannot read policy file: {exc.strerror or exc}", source=str(path),
                          hint="check the path, or run `capsem policy check` to see which file is used") from None
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(f"policy is larger than {MAX_POLICY_BYTES} bytes", source=str(path))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise PolicyError("file is not UTF-8", source=str(path), line=line) from None
    return parse_policy(text, str(path))


def default_policy() -> Policy:
    """What a kernel gets with no policy file: deny everything (DoH rules included for the audit)."""
    return parse_policy("", "<default: deny all>")

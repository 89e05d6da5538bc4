""""Allow this host…" from the Sandbox panel: the rule `capsem policy suggest` would write for one
refused audit row, and (admins only) adding it to the kernel's policy file.

The rule is always computed here, from the audit row the server reads (suggest.py, the CLI's
logic), never taken from the browser: the browser names a row id and the hash of the file text it
was shown. Adding goes through the CLI's `--apply` path (suggest_io.apply: the file re-parsed, the
new text must declare its old rules plus exactly the suggested ones and the same credentials, the
file must not have changed while it is written), plus the browser edit's own gate
(policy_edit.check_credentials_kept: credentials and [settings] as on the host) and one more
check: the file is still the one whose text the browser was shown (`base`), else nothing is
written (the admin decided on a different file).
"""

from __future__ import annotations

import hashlib
import shlex
from dataclasses import dataclass
from pathlib import Path

from capsem_vm.policy import PolicyError, parse_policy
from capsem_vm.policy import suggest, suggest_io
from capsem_vm.policy.addresses import own_addresses
from capsem_vm.policy.loader import MAX_POLICY_BYTES

from . import network
from .policy_edit import PolicyEditRefused, check_credentials_kept
from .policy_view import rule_summary


class AllowRefused(Exception):
    """Nothing was written. `status`: the HTTP status; `code`: a stable word for the panel."""

    def __init__(self, message: str, status: int = 409, code: str = "refused"):
        super().__init__(message)
        self.status, self.code = status, code


def file_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_policy_text(path: Path) -> str:
    """The file's text ('' if it does not exist yet). AllowRefused if it cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_POLICY_BYTES + 1)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise AllowRefused(f"cannot read the policy file {path}: {exc.strerror or exc}", 500, "unreadable") from None
    if len(data) > MAX_POLICY_BYTES:
        raise AllowRefused(f"the policy file {path} is larger than {MAX_POLICY_BYTES} bytes", 409, "invalid-policy")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise AllowRefused(f"the policy file {path} is not UTF-8", 409, "invalid-policy") from None


@dataclass
class Offer:
    """What the panel shows for one refused row."""
    row: dict
    file: Path
    base_text: str
    report: suggest.Report

    @property
    def rules(self) -> list[dict]:
        return self.report.rules()

    def addition(self) -> str:
        return suggest.render(self.report, source=f"the Sandbox panel (audit row {self.row.get('id')})",
                              for_apply=True)

    def as_json(self, kernel_id: str, db: Path, default_db: Path) -> dict:
        db_arg = "" if db == default_db else f" --db {shlex.quote(str(db))}"
        return {
            "row_id": self.row.get("id"),
            "file": str(self.file),
            "base": file_hash(self.base_text),
            "toml": suggest.render(self.report),
            "addition": self.addition() if self.rules else "",
            "rules": [summary(r) for r in self.rules],
            "refused": [{"what": r.what, "code": r.code, "why": r.why, "count": r.count}
                        for r in self.report.refused.values()],
            "already_allowed": self.report.already_allowed > 0,
            "command": f"capsem policy suggest --kernel {shlex.quote(kernel_id)}{db_arg} "
                       f"--apply {shlex.quote(str(self.file))}",
        }


def summary(rule: dict) -> dict:
    """A suggested rule as the panel lists it: its TOML keys and a one-line summary."""
    try:
        parsed = suggest.user_rules(parse_policy("\n".join(suggest.rule_toml(rule)) + "\n", "<rule>"))[0]
        text = rule_summary(parsed)
    except (PolicyError, IndexError):
        text = rule.get("name", "?")
    return {**rule, "summary": text}


def make_offer(db: Path, kernel_id: str, row_id: int, policy_file: Path) -> Offer:
    """The suggestion for row `row_id` of `kernel_id`, judged against `policy_file` as it is now.
    AllowRefused (404) if the row is not a refusal of that kernel."""
    row = network.refused_row(db, kernel_id, row_id, ("id",) + suggest_io.COLUMNS)
    if row is None:
        raise AllowRefused(f"audit row {row_id} is not a refused request of kernel {kernel_id}", 404, "no-row")
    base = read_policy_text(policy_file)
    try:
        policy = parse_policy(base, str(policy_file))
    except PolicyError as exc:
        raise AllowRefused(f"the policy file is invalid, fix it on the host first: {exc}", 409,
                           "invalid-policy") from None
    report = suggest.suggest([row], policy, own=own_addresses(), base_text=base)
    return Offer(row, policy_file, base, report)


def apply_offer(db: Path, kernel_id: str, row_id: int, policy_file: Path, base: str) -> Offer:
    """Append the rule suggested for the row to `policy_file`, after every check (module doc).
    Returns the offer that was written; AllowRefused (nothing written) otherwise."""
    offer = make_offer(db, kernel_id, row_id, policy_file)
    if file_hash(offer.base_text) != base:
        raise AllowRefused(f"{policy_file} changed since the suggestion was shown: nothing written, look at "
                           "the suggestion again", 409, "changed")
    if not offer.rules:
        why = "; ".join(f"{r.what}: [{r.code}] {r.why}" for r in offer.report.refused.values())
        if offer.report.already_allowed:
            why = "the current policy allows it already (the kernel may need the reload: see the panel)"
        raise AllowRefused(f"nothing to add for this request: {why or 'no rule can be suggested'}", 409,
                           "not-suggestible")
    addition = offer.addition()
    try:
        check_credentials_kept(policy_file, suggest_io.plan(offer.base_text, addition, offer.rules,
                                                            str(policy_file)))
    except PolicyEditRefused as exc:
        raise AllowRefused(str(exc), 403, "credentials") from None
    except suggest_io.SuggestError as exc:
        raise AllowRefused(str(exc), 409, "invalid-policy") from None

    def unchanged(_diff: str) -> bool:  # the file apply() just read is still the one shown
        return file_hash(read_policy_text(policy_file)) == base
    try:
        written = suggest_io.apply(policy_file, addition, offer.rules, unchanged)
    except suggest_io.SuggestError as exc:
        raise AllowRefused(str(exc), 409, "changed" if "changed" in str(exc) else "write-failed") from None
    if not written:
        raise AllowRefused(f"{policy_file} changed since the suggestion was shown: nothing written", 409, "changed")
    return offer


def change_fields(offer: Offer, user: str) -> dict:
    """The policy-change audit row's fields: who (the Jupyter user), what (the rules), where."""
    names = ", ".join(r["name"] for r in offer.rules)
    what = "; ".join(summary(r)["summary"] for r in offer.rules)
    return {"url": str(offer.file), "rule": names[:200], "host": offer.rules[0]["host"] if offer.rules else None,
            "reason": f"rule(s) {what} added by Jupyter user {user!r} from the Sandbox panel "
                      f"(audit row {offer.row.get('id')}); policy reloaded"}

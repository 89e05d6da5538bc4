"""What a policy edit from the browser may change (PUT /capsem/kernels/<id>/policy).

Whoever holds the Jupyter token can call it, notebook code included. Rules may change (the admin
opted in with allow_policy_edits); credentials never: a new credential, or a changed host, header,
query or file, would let the caller choose where the host's secrets go. So the `[[credential]]`
tables of the new text must be exactly those of the file it replaces (compared as TOML data), and
an edit is refused when the current file cannot be read as TOML (its credentials are unknown).
The `[settings]` are the host's too: `allow_doh` turns a built-in protection off and `observe` lets
through what the rules refuse, so their values (absent = false) must stay as they are.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from capsem_vm.policy.loader import SETTINGS


class PolicyEditRefused(Exception):
    """The edit may not be written; the message says why."""


def _credentials(text: str) -> list:
    creds = tomllib.loads(text).get("credential", [])
    return creds if isinstance(creds, list) else [creds]


def _settings(text: str) -> dict:
    settings = tomllib.loads(text).get("settings", {})
    settings = settings if isinstance(settings, dict) else {}
    return {key: bool(settings.get(key, False)) for key in SETTINGS}


def check_credentials_kept(target: Path, new_text: str) -> None:
    """Raise PolicyEditRefused unless `new_text` declares exactly the credentials and the settings
    `target` does now (none, all false, if it does not exist). `new_text` is already known to be a
    valid policy."""
    try:
        current = target.read_text(encoding="utf-8")
    except FileNotFoundError:
        current = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyEditRefused(f"the current policy file {target} cannot be read ({exc}): its credentials "
                                "are unknown, so no edit is accepted") from None
    try:
        before = _credentials(current)
    except tomllib.TOMLDecodeError:
        raise PolicyEditRefused(f"the current policy file {target} is not valid TOML: its credentials are "
                                "unknown, so no edit is accepted; fix it on the host") from None
    if _credentials(new_text) != before:
        names = sorted({str(c.get("name")) for c in before if isinstance(c, dict)})
        raise PolicyEditRefused(
            "policy edits from the browser cannot add, remove or change credentials ([[credential]] tables); "
            f"keep them exactly as in {target} ({', '.join(names) if names else 'none'}): credentials are "
            "changed on the host only")
    before_settings, after_settings = _settings(current), _settings(new_text)
    changed = sorted(k for k in SETTINGS if after_settings[k] != before_settings[k])
    if changed:
        raise PolicyEditRefused(
            f"policy edits from the browser cannot change [settings] ({', '.join(changed)}): allow_doh and "
            f"observe weaken built-in protections and are set in {target} on the host only")

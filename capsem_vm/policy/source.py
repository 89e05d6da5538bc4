"""Where a kernel's policy comes from: the kernelspec / Jupyter config (an explicit path), else the
user's config dir (`capsem_vm.paths.config_dir()/policy.toml`), else deny-all.

Never from a folder the guest can write (the shared notebook folder): the guest could rewrite its
own policy. Callers pass the folders they share with the guest; a policy inside one is refused, as
is a policy file that other users could modify, and so is a policy whose credential files lie in a
shared folder or could be changed by another user (secret_file.py).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .. import paths
from .loader import PolicyError, default_policy, load_policy
from .model import Policy
from .secret_file import location_problem

POLICY_FILE = "policy.toml"


def user_policy_path() -> Path:
    return paths.config_dir() / POLICY_FILE


def resolve_policy_path(explicit: str | os.PathLike | None = None) -> Path | None:
    """The file that applies, or None for the built-in deny-all policy."""
    if explicit:
        return Path(explicit).expanduser()
    p = user_policy_path()
    return p if p.exists() else None


def check_policy_location(path: Path, guest_writable: list[str | os.PathLike] = ()) -> None:
    """Refuse policies the guest or another user could change."""
    real = path.resolve()
    for shared in guest_writable:
        s = Path(shared).resolve()
        if real == s or s in real.parents:
            raise PolicyError(
                f"policy file is inside {s}, a folder the VM can write", source=str(path),
                hint="keep policies in the kernelspec, Jupyter config or "
                     f"{user_policy_path()}, never in the notebook folder")
    try:
        st = real.stat()
    except OSError as exc:
        raise PolicyError(f"cannot read policy file: {exc.strerror}", source=str(path)) from None
    if st.st_uid not in (os.geteuid(), 0):
        raise PolicyError(f"policy file is owned by uid {st.st_uid}, not by you or root", source=str(path),
                          hint="copy it to a file you own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PolicyError("policy file is writable by other users", source=str(path),
                          hint=f"chmod go-w {path}")


def check_credential_files(policy: Policy, shares: list[str | os.PathLike] = ()) -> None:
    """Refuse a policy whose credential files the VM (through `shares`, any mode) or another user
    could read or write (capsem_vm/policy/secret_file.py)."""
    for cred in policy.credentials:
        if cred.file:
            problem = location_problem(cred.file, shares)
            if problem:
                raise PolicyError(
                    f"credential {cred.name!r} ({cred.origin}): file {cred.file} {problem}", source=policy.source,
                    hint="keep credential files outside every shared folder, owned by you (or root), "
                         "e.g. chmod 600 and directories chmod go-w")


def load_kernel_policy(explicit: str | os.PathLike | None = None,
                       guest_writable: list[str | os.PathLike] = ()) -> Policy:
    """The policy for a kernel. `explicit` comes from the kernelspec or Jupyter config only.
    `guest_writable`: the folders shared with the VM (the VM and the pool pass every share, read-only
    ones too: a credential file in one would be readable by the guest)."""
    path = resolve_policy_path(explicit)
    if path is None:
        return default_policy()
    check_policy_location(path, guest_writable)
    policy = load_policy(path)
    check_credential_files(policy, guest_writable)
    return policy

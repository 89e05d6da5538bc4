"""What `capsem setup` would do on a host, from facts about it (sans-IO: no reads, no writes).

plan_setup(facts, options) -> [Step]. Each step is in one state:
  do       carry it out now (steps.py)
  done     already there: nothing to do (an idempotent second run is all `done`)
  root     needs root: `commands` are the exact commands for an administrator
  blocked  cannot be done here: `detail` says why
  off      turned off by an option (--no-packages, --no-proxy-env, --no-image)
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from .hostos import DEV_PACKAGES, MIN_PYTHON, host_release, manual_install_text
from .locations import SYSTEM_PREFIX

SYSTEM_PROXY_ENV = f"{SYSTEM_PREFIX}/proxy-venv"   # (locations.system_proxy_env(): unless moved)
VSOCK_BIN = f"{SYSTEM_PREFIX}/bin/vhost-device-vsock"  # helpers.py looks here

DO, DONE, ROOT, BLOCKED, OFF = "do", "done", "root", "blocked", "off"
# what an administrator runs for the parts a normal user cannot do (capsem installed for root)
ROOT_SETUP = "capsem setup"


@dataclass(frozen=True)
class ProxyEnvFacts:
    path: str
    exists: bool = False             # a bin/python is there
    mitmproxy: str | None = None     # its mitmproxy version (None: none importable)
    dists: frozenset[str] = frozenset()  # its installed distributions (normalized names)


@dataclass(frozen=True)
class ImageFacts:
    cache: str                       # the cache this run builds into (/var/cache/capsem for root)
    current: bool = False            # the default recipe's image of this builder version is there
    old: tuple[str, ...] = ()        # image dirs of an older builder version (retired by setup)


@dataclass(frozen=True)
class Facts:
    os_release: dict[str, str]
    is_root: bool
    installed: frozenset[str] = frozenset()      # packages dpkg has installed
    commands: frozenset[str] = frozenset()       # of DEV_PACKAGES' commands found (npm)
    vsock: str | None = None                     # a usable vhost-device-vsock, if any
    system_proxy: ProxyEnvFacts = ProxyEnvFacts(SYSTEM_PROXY_ENV)
    user_proxy: ProxyEnvFacts | None = None      # the per-user (or --proxy-env) location
    proxy_python: str = "/usr/bin/python3"       # what makes a new proxy env
    proxy_python_version: tuple[int, int] = (3, 11)
    known_mitmproxy: tuple[str, ...] = ("11.0.2",)
    requirements: tuple[str, ...] = ()           # the proxy env's pip requirements
    image: ImageFacts | None = None              # None: not looked at (--no-image)
    system_image: bool = False                   # a default image root built for everyone is there


@dataclass(frozen=True)
class Options:
    packages: bool = True
    proxy_env: bool = True
    image: bool | None = None        # None: root builds the system image, a normal user does not
    dev: bool = False                # also what working on capsem needs (make, nodejs, npm, chromium)
    proxy_env_path: str | None = None  # make the proxy env here (the checkout's .venv-proxy)


@dataclass(frozen=True)
class Step:
    key: str
    title: str
    state: str
    detail: str = ""
    commands: tuple[str, ...] = ()
    data: dict = field(default_factory=dict, compare=False)


def missing_packages(facts: Facts, wanted: tuple[str, ...]) -> list[str]:
    out = []
    for p in wanted:
        if p in facts.installed or (p == "npm" and "npm" in facts.commands):
            continue
        out.append(p)
    return out


def _apt_command(packages: list[str]) -> str:
    return ("apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
            + " ".join(packages))


def plan_packages(facts: Facts, options: Options) -> list[Step]:
    if not options.packages:
        return [Step("packages", "host packages", OFF, "--no-packages")]
    release = host_release(facts.os_release)
    if release is None:
        return [Step("packages", "host packages", BLOCKED, manual_install_text(facts.os_release))]
    if release.refusal:
        return [Step("packages", "host packages", BLOCKED, release.refusal)]
    wanted = release.packages + (DEV_PACKAGES if options.dev else ())
    missing = missing_packages(facts, wanted)
    note = f" ({release.note})" if release.note else ""
    steps = []
    if not missing:
        steps.append(Step("packages", "host packages", DONE, f"all {len(wanted)} installed on {release.name}{note}"))
    elif facts.is_root:
        steps.append(Step("packages", "host packages", DO, f"install {' '.join(missing)} on {release.name}{note}",
                          (_apt_command(missing),), {"packages": missing}))
    else:
        steps.append(Step("packages", "host packages", ROOT, f"missing on {release.name}: {' '.join(missing)}{note}",
                          (_apt_command(missing),)))
    if facts.vsock:
        steps.append(Step("vsock", "vhost-device-vsock", DONE, facts.vsock))
    elif facts.is_root:
        steps.append(Step("vsock", "vhost-device-vsock", DO,
                          f"from {release.name}'s archive when it has it, else Debian unstable's .deb "
                          f"unpacked to {VSOCK_BIN}", (),
                          {"dest": VSOCK_BIN}))
    else:
        steps.append(Step("vsock", "vhost-device-vsock", ROOT, f"not installed (needed where /dev/vhost-vsock "
                          f"is missing); root fetches it to {VSOCK_BIN}",
                          (f"{ROOT_SETUP} --no-proxy-env --no-image",)))
    return steps


def requirement_name(req: str) -> str:
    """The normalized distribution name of a requirement (PEP 503): "uvloop>=0.19" -> "uvloop"."""
    name = req.split(";")[0]
    for stop in "<>=!~[ (":
        name = name.split(stop)[0]
    return "-".join(name.replace("_", "-").replace(".", "-").lower().split("-"))


def requirements_for(requirements, python: tuple[int, int]) -> tuple[str, ...]:
    """The requirements whose PEP 508 environment markers hold for that Python (the one the proxy env
    is made from, not necessarily this process's): "mitmproxy==11.0.2; python_version < '3.12'" is
    kept for (3, 11) only. packaging is imported here, not at the top: the packages part of setup
    runs on a bare system Python."""
    from packaging.requirements import Requirement
    env = {"python_version": f"{python[0]}.{python[1]}", "python_full_version": f"{python[0]}.{python[1]}.0"}
    return tuple(r for r in requirements
                 if (marker := Requirement(r).marker) is None or marker.evaluate(env))


def pinned_versions(requirements, name: str) -> tuple[str, ...]:
    """The exact versions (==) the requirements pin for distribution `name` (normalized)."""
    from packaging.requirements import Requirement
    return tuple(spec.version for r in requirements
                 if requirement_name((req := Requirement(r)).name) == name
                 for spec in req.specifier if spec.operator in ("==", "==="))


def _env_ok(env: ProxyEnvFacts, facts: Facts) -> bool:
    return (env.exists and env.mitmproxy in facts.known_mitmproxy
            and all(requirement_name(r) in env.dists
                    for r in requirements_for(facts.requirements, facts.proxy_python_version)))


def plan_proxy_env(facts: Facts, options: Options) -> Step:
    title = "egress proxy env"
    if not options.proxy_env:
        return Step("proxy-env", title, OFF, "--no-proxy-env")
    if facts.proxy_python_version < MIN_PYTHON:
        return Step("proxy-env", title, BLOCKED,
                    f"{facts.proxy_python} is Python {'.'.join(map(str, facts.proxy_python_version))}, below "
                    f"the minimum {'.'.join(map(str, MIN_PYTHON))}")
    explicit = options.proxy_env_path is not None
    if explicit:
        target = facts.user_proxy or ProxyEnvFacts(options.proxy_env_path or "")
    elif facts.is_root:
        target = facts.system_proxy
    else:
        if _env_ok(facts.system_proxy, facts):
            return Step("proxy-env", title, DONE, f"the system one: {facts.system_proxy.path} "
                        f"(mitmproxy {facts.system_proxy.mitmproxy})")
        target = facts.user_proxy or ProxyEnvFacts("")
    if _env_ok(target, facts):
        return Step("proxy-env", title, DONE, f"{target.path} (mitmproxy {target.mitmproxy})")
    why = (f"replace: it has mitmproxy {target.mitmproxy}, capsem knows {', '.join(facts.known_mitmproxy)}"
           if target.exists and target.mitmproxy else "create")
    q = shlex.quote(target.path)
    reqs = " ".join(map(shlex.quote, facts.requirements))
    applies = requirements_for(facts.requirements, facts.proxy_python_version)  # what pip will pick
    return Step("proxy-env", title, DO, f"{why} {target.path} with {facts.proxy_python} "
                f"({', '.join(applies)})",
                (f"{shlex.quote(facts.proxy_python)} -m venv --clear {q}", f"{q}/bin/pip install {reqs}"),
                {"path": target.path, "python": facts.proxy_python, "requirements": list(facts.requirements)})


def plan_image(facts: Facts, options: Options) -> list[Step]:
    title = "VM image"
    want = facts.is_root if options.image is None else options.image
    if options.image is False:
        return [Step("image", title, OFF, "--no-image")]
    if not want:  # a normal user by default: the image root built for everyone
        if facts.system_image:
            return [Step("image", title, DONE, "the system image (built by root) serves this user")]
        return [Step("image", title, ROOT, "no system image yet: root builds it (or build your own: "
                     "`capsem setup --image`)", (ROOT_SETUP,))]
    img = facts.image or ImageFacts("")
    steps = []
    if img.current:
        steps.append(Step("image", title, DONE, f"the default image is in {img.cache}/images"))
    else:
        steps.append(Step("image", title, DO, f"build the default image into {img.cache}/images (a few minutes)",
                          ("capsem image build",), {"cache": img.cache}))
    # after the build: a failed build leaves the old images usable
    if img.old:
        steps.append(Step("retire-images", "older images", DO,
                          f"remove {len(img.old)} image(s) of an older builder version from {img.cache}/images "
                          "(the CA, keys and audit data stay)",
                          tuple(f"rm -r {shlex.quote(p)}" for p in img.old), {"dirs": list(img.old)}))
    return steps


def plan_setup(facts: Facts, options: Options) -> list[Step]:
    """Every step of `capsem setup` with these facts and options, in order."""
    return [*plan_packages(facts, options), plan_proxy_env(facts, options), *plan_image(facts, options)]


def root_commands(steps: list[Step]) -> list[str]:
    """What an administrator must run for the steps a normal user cannot do."""
    out: list[str] = []
    for s in steps:
        if s.state == ROOT:
            out.extend(c for c in s.commands if c not in out)
    return out

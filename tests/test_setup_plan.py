"""`capsem setup`'s planning and `capsem uninstall`'s choice of targets: pure logic (sans-IO), with
the os-release files of the releases it knows (tests/data/os-release), plus the plan it prints on
this machine (`capsem setup --dry-run`, which changes nothing)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from capsem_vm.setup import plan as P
from capsem_vm.setup.hostos import BASE_PACKAGES, DEV_PACKAGES, host_release, parse_os_release
from capsem_vm.setup.removal import DATA, STATE, Target, plan_removal, unsafe_reason

REPO = Path(__file__).resolve().parent.parent
OS = REPO / "tests" / "data" / "os-release"
REQS = ("mitmproxy==11.0.2", "platformdirs>=3", "uvloop>=0.19")
ALL_DISTS = frozenset({"mitmproxy", "platformdirs", "uvloop", "tornado"})


def release(name: str) -> dict[str, str]:
    return parse_os_release((OS / name).read_text())


def facts(name="debian-12", *, root=True, installed=None, **kw) -> P.Facts:
    rel = host_release(release(name))
    pkgs = (rel.packages if rel else ()) + DEV_PACKAGES
    base = dict(os_release=release(name), is_root=root,
                installed=frozenset(pkgs) if installed is None else frozenset(installed),
                vsock="/opt/capsem/bin/vhost-device-vsock", requirements=REQS, known_mitmproxy=("11.0.2",),
                system_proxy=P.ProxyEnvFacts(P.SYSTEM_PROXY_ENV, True, "11.0.2", ALL_DISTS),
                user_proxy=P.ProxyEnvFacts("/home/u/.local/share/capsem/proxy-venv"),
                image=P.ImageFacts("/var/cache/capsem", current=True), system_image=True)
    base.update(kw)
    return P.Facts(**base)


def states(steps):
    return {s.key: s.state for s in steps}


def test_os_release_files_map_to_their_releases():
    d12, d13, u24, u22 = (host_release(release(n)) for n in ("debian-12", "debian-13", "ubuntu-24.04", "ubuntu-22.04"))
    assert (d12.id, d12.version_id, d12.tested) == ("debian", "12", True) and d12.packages == BASE_PACKAGES
    assert "virtiofsd" in d13.packages and "virtiofsd" not in d12.packages  # QEMU 10 has no C virtiofsd
    assert "virtiofsd" in u24.packages and not u24.tested and "untested" in u24.note
    assert u22.refusal and "3.10" in u22.refusal and "3.11" in u22.refusal
    assert host_release(release("fedora-41")) is None


@given(st.text())
def test_parse_os_release_is_total(text):
    out = parse_os_release(text)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in out.items())


@given(st.from_regex(r"[A-Z][A-Z_]{0,10}", fullmatch=True), st.text(alphabet=st.characters(
    blacklist_categories=("Cs", "Cc")), max_size=40))
def test_parse_os_release_unquotes_what_it_quoted(key, value):
    import shlex
    assert parse_os_release(f"{key}={shlex.quote(value)}\n").get(key) == value


@pytest.mark.parametrize("name", ["debian-12", "debian-13", "ubuntu-24.04"])
def test_a_second_run_has_nothing_to_do(name):
    steps = P.plan_setup(facts(name), P.Options(dev=True))
    assert all(s.state == P.DONE for s in steps), steps
    assert P.root_commands(steps) == []


@pytest.mark.parametrize("name,missing", [("debian-12", ["uidmap"]), ("debian-13", ["virtiofsd", "mmdebstrap"]),
                                          ("ubuntu-24.04", ["virtiofsd", "debian-archive-keyring"])])
def test_root_installs_what_is_missing_and_a_user_gets_the_exact_command(name, missing):
    rel = host_release(release(name))
    have = [p for p in rel.packages if p not in missing]
    as_root = P.plan_setup(facts(name, installed=have, vsock=None), P.Options())
    pkgs = as_root[0]
    missing = [p for p in rel.packages if p in missing]  # in the release's order
    assert pkgs.state == P.DO and pkgs.data["packages"] == missing
    assert states(as_root)["vsock"] == P.DO
    as_user = P.plan_setup(facts(name, root=False, installed=have, vsock=None), P.Options())
    assert states(as_user)["packages"] == P.ROOT and states(as_user)["vsock"] == P.ROOT
    cmds = P.root_commands(as_user)
    assert cmds[0] == ("apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "
                       "--no-install-recommends " + " ".join(missing))
    assert "capsem setup --no-proxy-env --no-image" in cmds


def test_dev_adds_the_checkout_packages_and_npm_counts_as_a_command():
    have = BASE_PACKAGES + ("make", "nodejs", "chromium")
    assert states(P.plan_setup(facts(installed=have), P.Options()))["packages"] == P.DONE
    assert P.plan_setup(facts(installed=have), P.Options(dev=True))[0].data["packages"] == ["npm"]
    with_npm = facts(installed=have, commands=frozenset({"npm"}))
    assert states(P.plan_setup(with_npm, P.Options(dev=True)))["packages"] == P.DONE


@pytest.mark.parametrize("name,words", [("ubuntu-22.04", ["3.10"]), ("fedora-41", ["QEMU", "virtiofsd",
                                                                               "vhost-device-vsock", "mmdebstrap"])])
def test_an_unknown_or_too_old_release_is_refused_with_what_to_do(name, words):
    steps = P.plan_setup(facts(name), P.Options())
    assert steps[0].state == P.BLOCKED and all(w in steps[0].detail for w in words), steps[0].detail


def test_the_proxy_env_root_makes_the_system_one_a_user_uses_it_or_makes_their_own():
    none = P.ProxyEnvFacts(P.SYSTEM_PROXY_ENV)
    root = P.plan_proxy_env(facts(system_proxy=none), P.Options())
    assert root.state == P.DO and root.data["path"] == P.SYSTEM_PROXY_ENV and root.data["requirements"] == list(REQS)
    assert P.plan_proxy_env(facts(root=False), P.Options()).state == P.DONE  # the system one serves
    user = P.plan_proxy_env(facts(root=False, system_proxy=none), P.Options())
    assert user.state == P.DO and user.data["path"] == "/home/u/.local/share/capsem/proxy-venv"
    explicit = P.plan_proxy_env(facts(user_proxy=P.ProxyEnvFacts("/w/.venv-proxy")),
                                P.Options(proxy_env_path="/w/.venv-proxy"))
    assert explicit.state == P.DO and explicit.data["path"] == "/w/.venv-proxy"


@pytest.mark.parametrize("env", [P.ProxyEnvFacts("/p", True, "12.1.2", ALL_DISTS),   # a version not known
                                 P.ProxyEnvFacts("/p", True, None, frozenset()),      # no mitmproxy
                                 P.ProxyEnvFacts("/p", True, "11.0.2", frozenset({"mitmproxy"}))])  # no uvloop
def test_a_proxy_env_without_exactly_what_is_required_is_remade(env):
    step = P.plan_proxy_env(facts(user_proxy=env), P.Options(proxy_env_path="/p"))
    assert step.state == P.DO and "--clear" in step.commands[0]


def test_a_proxy_python_below_the_minimum_is_refused():
    step = P.plan_proxy_env(facts(system_proxy=P.ProxyEnvFacts(P.SYSTEM_PROXY_ENV), proxy_python_version=(3, 10)),
                            P.Options())
    assert step.state == P.BLOCKED and "3.10" in step.detail


def test_images_root_builds_then_retires_older_builders_a_user_uses_the_system_one():
    old = ("/var/cache/capsem/images/aaa", "/var/cache/capsem/images/bbb")
    steps = P.plan_image(facts(image=P.ImageFacts("/var/cache/capsem", current=False, old=old)), P.Options())
    assert [(s.key, s.state) for s in steps] == [("image", P.DO), ("retire-images", P.DO)]  # build first
    assert steps[1].data["dirs"] == list(old) and "CA" in steps[1].detail
    assert [s.state for s in P.plan_image(facts(), P.Options())] == [P.DONE]
    assert P.plan_image(facts(), P.Options(image=False))[0].state == P.OFF
    assert P.plan_image(facts(root=False), P.Options())[0].state == P.DONE
    nosys = P.plan_image(facts(root=False, system_image=False), P.Options())[0]
    assert nosys.state == P.ROOT and nosys.commands == ("capsem setup",) and "--image" in nosys.detail
    own = P.plan_image(facts(root=False, image=P.ImageFacts("/home/u/.cache/capsem")), P.Options(image=True))
    assert own[0].state == P.DO


def test_the_proxy_pins_are_exactly_the_versions_the_patch_gate_accepts():
    """pyproject's proxy extra == PROXY_REQUIREMENTS (what setup installs); its mitmproxy pins ==
    mitm_patches.KNOWN_VERSIONS, read in the proxy env (the module gates on import)."""
    from capsem_vm.proxy.service import PROXY_REQUIREMENTS, find_proxy_python
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["proxy"]
    assert sorted(extra) == sorted(PROXY_REQUIREMENTS)
    pins = set(P.pinned_versions(extra, "mitmproxy"))  # one per Python range (environment markers)
    assert len(pins) == 2, pins
    out = subprocess.run([find_proxy_python(), "-c", "from capsem_vm.proxy import mitm_patches as m; "
                          "print(' '.join(sorted(m.KNOWN_VERSIONS)))"],
                         capture_output=True, text=True, timeout=120, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'guest-agent'}"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert set(out.stdout.split()) == pins


def test_hints_name_capsem_setup():
    from capsem_vm import helpers
    from capsem_vm.proxy.service import proxy_env_hint
    assert "capsem setup" in helpers.SETUP_HINT and "capsem setup" in proxy_env_hint()
    assert P.SYSTEM_PROXY_ENV in proxy_env_hint()
    text = (REPO / "capsem_vm" / "proxy" / "mitm_patches.py").read_text()
    assert "Recreate the proxy env with `capsem setup`" in text


def test_the_proxy_env_is_looked_for_in_the_checkout_then_the_system_then_the_user():
    from capsem_vm import paths
    from capsem_vm.proxy.service import proxy_venvs
    assert proxy_venvs() == (Path(sys.prefix).parent / ".venv-proxy", Path("/opt/capsem/proxy-venv"),
                             paths.data_dir() / "proxy-venv")


def test_capsem_system_prefix_moves_the_system_proxy_env(monkeypatch, tmp_path):
    from capsem_vm.proxy.service import proxy_venvs
    from capsem_vm.setup.locations import system_proxy_env
    monkeypatch.setenv("CAPSEM_SYSTEM_PREFIX", str(tmp_path))
    assert system_proxy_env() == f"{tmp_path}/proxy-venv" and proxy_venvs()[1] == tmp_path / "proxy-venv"


# --- uninstall: which paths -------------------------------------------------------------------

@given(st.lists(st.sampled_from(["home", "u", "a", "..", "."]), max_size=5))
def test_no_ancestor_of_home_nor_home_nor_root_is_ever_removed(parts):
    home = "/home/u"
    path = os.path.normpath("/" + "/".join(parts))
    unsafe = path == "/" or home == path or home.startswith(path.rstrip("/") + "/")
    assert (unsafe_reason(path, home) is not None) == unsafe
    assert unsafe_reason("relative/dir", home) is not None


def test_removal_plan_keeps_data_unless_asked_and_lists_each_existing_thing_once():
    cands = [Target("/c/cache", "images", STATE), Target("/c/cache/images", "images again", STATE),
             Target("/d/proxy-venv", "proxy env", STATE), Target("/missing", "runtime", STATE),
             Target("/d", "CA", DATA), Target("/home/u", "bad override", STATE), Target("/cfg", "policies", DATA)]
    present = {"/c/cache", "/c/cache/images", "/d/proxy-venv", "/d", "/home/u", "/cfg"}
    targets, notes = plan_removal(cands, exists=present.__contains__, home="/home/u", data=False)
    assert [t.path for t in targets] == ["/c/cache", "/d/proxy-venv"]
    assert any("kept CA" in n for n in notes) and any("refused /home/u" in n for n in notes)
    targets, _ = plan_removal(cands, exists=present.__contains__, home="/home/u", data=True)
    assert [t.path for t in targets] == ["/c/cache", "/d/proxy-venv", "/d", "/cfg"]


# --- on this machine --------------------------------------------------------------------------

def _setup(*args, env=None):
    return subprocess.run([sys.executable, "-m", "capsem_vm.cli", "setup", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_dry_run_on_this_machine_plans_and_changes_nothing(tmp_path):
    this = parse_os_release(Path("/etc/os-release").read_text())
    env = {"CAPSEM_CACHE_DIR": str(tmp_path / "cache"), "CAPSEM_DATA_DIR": str(tmp_path / "data")}
    out = _setup("--dry-run", env=env)
    assert out.returncode == 0, out.stderr
    assert this["PRETTY_NAME"] in out.stdout and "host packages" in out.stdout and "egress proxy env" in out.stdout
    assert "VM image" in out.stdout
    # (the data dir itself is made by the `capsem` command's imports, --help too: not setup's doing)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "data" / "proxy-venv").exists()


@pytest.mark.parametrize("name,expect", [("debian-13", "virtiofsd"), ("ubuntu-24.04", "untested"),
                                         ("ubuntu-22.04", "3.10"), ("fedora-41", "no package list")])
def test_dry_run_for_another_release(name, expect, tmp_path):
    out = _setup("--dry-run", "--no-proxy-env", "--no-image", "--os-release", str(OS / name))
    assert out.returncode == 0 and expect in out.stdout, out.stdout + out.stderr


def test_the_packages_part_runs_on_the_system_python_without_the_venv():
    """`make system` runs before the venv exists: python3 -m capsem_vm.setup, stdlib only."""
    out = subprocess.run(["/usr/bin/python3", "-S", "-m", "capsem_vm.setup", "--dry-run", "--dev",
                          "--no-proxy-env", "--no-image"], capture_output=True, text=True, timeout=120, cwd=REPO,
                         env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert "host packages" in out.stdout


PAIR = ("mitmproxy==11.0.2; python_version < '3.12'", "mitmproxy==12.3.1; python_version >= '3.12'",
        "platformdirs>=3", "uvloop>=0.19")


@given(st.integers(10, 20))
def test_exactly_one_mitmproxy_pin_holds_for_each_python(minor):
    """The markers are evaluated for the proxy env's Python, not this process's: 11.0.2 below 3.12,
    12.3.1 from 3.12 on; the other requirements hold everywhere."""
    from capsem_vm.proxy.service import PROXY_REQUIREMENTS
    held = P.requirements_for(PROXY_REQUIREMENTS, (3, minor))
    assert P.pinned_versions(held, "mitmproxy") == (("11.0.2",) if minor < 12 else ("12.3.1",))
    assert [r for r in held if not r.startswith("mitmproxy")] == ["platformdirs>=3", "uvloop>=0.19"]


def test_an_env_is_judged_by_the_pin_for_its_python():
    """On Python 3.13 an env with 11.0.2 is replaced by one with 12.3.1 (and the reverse on 3.11); the
    marker pair is handed to pip as is (pip evaluates it in the new env)."""
    for python, good, bad in (((3, 11), "11.0.2", "12.3.1"), ((3, 13), "12.3.1", "11.0.2")):
        known = P.pinned_versions(P.requirements_for(PAIR, python), "mitmproxy")
        for version, state in ((good, P.DONE), (bad, P.DO)):
            f = facts(requirements=PAIR, known_mitmproxy=known, proxy_python_version=python,
                      system_proxy=P.ProxyEnvFacts(P.SYSTEM_PROXY_ENV, True, version, ALL_DISTS))
            step = P.plan_proxy_env(f, P.Options())
            assert step.state == state, (python, version, step)
            if state == P.DO:
                assert step.data["requirements"] == list(PAIR) and f"capsem knows {good}" in step.detail


def test_gathered_facts_know_the_pin_for_the_proxy_python():
    from capsem_vm.setup import facts as F
    got = F.gather(P.Options(packages=False, image=False))
    assert got.known_mitmproxy == P.pinned_versions(
        P.requirements_for(got.requirements, got.proxy_python_version), "mitmproxy")
    assert len(got.known_mitmproxy) == 1


def test_the_other_release_root_installs_exactly_the_proxy_requirements():
    """scripts/other-release.sh builds the release root's proxy env from PROXY_PIP: the same list."""
    import shlex
    from capsem_vm.proxy.service import PROXY_REQUIREMENTS
    text = (REPO / "scripts" / "other-release.sh").read_text()
    start = text.index("PROXY_PIP=(") + len("PROXY_PIP=(")
    assert tuple(shlex.split(text[start:text.index(")", start)])) == PROXY_REQUIREMENTS

"""The presets exercised by the real clients in a real capsem guest (one VM for the module), each
fetching through the proxy from a local stand-in (tests/local_registries.py) that the proxy's
static resolve map puts where the real registry's name would be (nothing in /etc/hosts, no real
registry contacted). The policy is the presets pypi, debian, huggingface-models and npm exactly as
capsem_vm/policy/presets.py has them, each rule given only `addresses = [<the stand-ins' loopback
address>]` (loopback is reached by no rule that does not name it): their hosts are disjoint, and
each test checks that every request its client made was allowed by its own preset's rules.

Clients: pip (the guest's), apt (the guest's, `apt-get update` + `apt-get download` from an
unsigned archive the sources list marks [trusted=yes]), huggingface_hub (pip-installed in the guest
from the local "PyPI", wheels rebuilt from the host venv), npm (the host's node binary and npm,
copied into the shared folder and run in the guest: the image has no node). Each also checks that
a neighbour stays refused: another host, a path or method outside the preset.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

import local_registries as lr
from egress_world import WHEEL_NAME, World

from capsem_kernel import loop_thread

pytestmark = pytest.mark.vm

PRESETS = ("pypi", "debian", "huggingface-models", "npm")
TIMES: dict[str, float] = {}  # client -> seconds in the guest (printed at the end)


class Env:
    pass


@pytest.fixture(scope="module")
def env(image_dir, tmp_path_factory):
    from capsem_kernel import Sandbox
    tmp = tmp_path_factory.mktemp("presetclients")
    os.chmod(tmp, 0o755)
    mp = pytest.MonkeyPatch()
    e = Env()
    e.addr = lr.random_loopback()
    wheels = dict(lr.wheel_from_installed(d) for d in lr.requirement_closure("huggingface_hub"))

    def standins(w):  # called by World.create on the loop, before the proxy starts (it reads the CA file)
        wheels[WHEEL_NAME] = w.wheel
        e.regs = lr.Registries(tmp, e.addr, w.upstream_ca, wheels)
        return ""

    e.w = loop_thread.run_sync(World.create(tmp, extra_policy=standins,
                                            extra_resolve={n: e.addr for n in lr.ALL_NAMES}), timeout=180)
    try:
        # only the presets: the world's own rules are not in the file the kernel gets
        e.w.policy_file.write_text(lr.preset_policy(list(PRESETS), e.addr))
        e.rt = tmp / "rt"
        e.rt.mkdir(mode=0o700)
        mp.setenv("CAPSEM_RUNTIME_DIR", str(e.rt))
        e.sandbox = Sandbox(policy=e.w.policy_file, timeout=900)
        yield e
    finally:
        if hasattr(e, "sandbox"):
            e.sandbox.close()
        if hasattr(e, "regs"):
            loop_thread.run_sync(_close(e.regs), timeout=30)
        loop_thread.run_sync(e.w.close(), timeout=60)
        mp.undo()
        print("\nclient times in the guest (s):", {k: round(v, 1) for k, v in TIMES.items()})


async def _close(regs):
    regs.close()


def run(e, label: str, cmd: str, **kw):
    """Run `cmd` in the guest; returns (result, the audit rows it caused). Times it under `label`."""
    cursor = e.sandbox._network_cursor()
    t0 = time.monotonic()
    r = e.sandbox.commands.run(cmd, **kw)
    if label:
        TIMES[label] = TIMES.get(label, 0.0) + time.monotonic() - t0
    return r, e.sandbox.network_log(after_id=cursor)


def preset_rules(name: str) -> set[str]:
    from capsem_vm.policy.presets import PRESETS as ALL
    return {r["name"] for r in ALL[name]}


def assert_only(rows, preset: str):
    """Every request was allowed by `preset`'s rules; returns the allowed HTTP rows."""
    http = [r for r in rows if r["kind"] == "http"]
    assert http, rows
    bad = [r for r in http if r["decision"] != "allow" or r["rule"] not in preset_rules(preset)]
    assert not bad, bad
    return http


def curl_status(env, url: str, method: str = "GET") -> tuple[str, list[dict]]:
    r, rows = run(env, "", f"curl -s -o /dev/null -w '%{{http_code}}' -X {method} --max-time 120 {url}")
    return r.stdout.strip(), rows


def assert_refused(env, url: str, code: str, method: str = "GET"):
    status, rows = curl_status(env, url, method)
    assert status in ("403", "000"), (url, status)  # 000: refused at DNS or connect
    assert any(r["decision"] == "deny" and r["code"] == code for r in rows), (url, rows)
    host, path = url.split("/", 3)[2], "/" + url.split("/", 3)[3]
    assert (method, host, path) not in env.regs.seen, f"{method} {url} reached the stand-in"


PIP_ENV = {"PIP_BREAK_SYSTEM_PACKAGES": "1"}  # as in the kernel (PEP 668 lifted in the VM)


def test_pip_with_the_pypi_preset(env):
    r, rows = run(env, "pip", "python3 -m pip install --no-cache-dir --no-deps capsem-hello "
                  "&& python3 -c 'import capsem_hello; print(capsem_hello.GREETING)'", env=PIP_ENV)
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "hello from a wheel served by the test index" in r.stdout
    http = assert_only(rows, "pypi")
    assert {r["host"] for r in http} == {"pypi.org", "files.pythonhosted.org"}
    # neighbours: another host (an index no rule names), a path and a method outside the preset
    assert_refused(env, "https://test.pypi.org/simple/capsem-hello/", "default-deny")
    assert_refused(env, "https://pypi.org/account/login/", "default-deny")
    assert_refused(env, "https://pypi.org/simple/capsem-hello/", "default-deny", method="POST")


SOURCES = f"deb [trusted=yes] http://deb.debian.org/debian {lr.DEB_SUITE} main"
APT = ("-o Dir::Etc::sourcelist=/tmp/apt/sources.list -o Dir::Etc::sourceparts=/dev/null "
       "-o Dir::State::Lists=/tmp/apt/lists -o Dir::Cache=/tmp/apt/cache -o Acquire::Languages=none "
       "-o Debug::NoLocking=1 -o APT::Sandbox::User=root")


def test_apt_with_the_debian_preset(env):
    r, rows = run(env, "apt", f"set -e; rm -rf /tmp/apt; mkdir -p /tmp/apt/lists/partial /tmp/apt/cache/archives/partial "
                  f"/tmp/apt/dl; echo '{SOURCES}' > /tmp/apt/sources.list; cd /tmp/apt/dl; "
                  f"apt-get {APT} update; apt-get {APT} download capsem-hello-deb; "
                  f"dpkg-deb -c {env.regs.debian.deb_name}")
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "./usr/share/capsem-hello/hello.txt" in r.stdout
    http = assert_only(rows, "debian")
    assert any(r["url"].endswith(env.regs.debian.deb_name) for r in http)
    assert_refused(env, "http://ftp.debian.org/debian/dists/", "default-deny")
    assert_refused(env, "http://deb.debian.org/debian-ports/dists/", "default-deny")


HF_CODE = (f"from huggingface_hub import hf_hub_download\n"
           f"p = hf_hub_download({lr.HF_REPO!r}, {lr.HF_FILE!r})\nprint(open(p).read())")


def test_huggingface_hub_with_the_huggingface_models_preset(env):
    r, rows = run(env, "pip install huggingface_hub", "python3 -m pip install --no-cache-dir huggingface_hub",
                  env=PIP_ENV)
    assert r.exit_code == 0, r.stdout + r.stderr
    assert_only(rows, "pypi")
    r, rows = run(env, "huggingface_hub", "python3 - <<'EOF'\n" + HF_CODE + "\nEOF",
                  env={"HF_HOME": "/tmp/hf", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"})
    assert r.exit_code == 0, r.stdout + r.stderr
    assert lr.HF_BODY.decode().strip() in r.stdout
    http = assert_only(rows, "huggingface-models")
    assert {r["host"] for r in http} == {"huggingface.co", "cdn-lfs.hf.co"}
    assert_refused(env, "https://hub.hf.example.co/repos/x", "default-deny")
    assert_refused(env, "https://huggingface.co/api/spaces/x", "default-deny")
    assert_refused(env, f"https://huggingface.co/{lr.HF_REPO}/resolve/main/{lr.HF_FILE}", "default-deny",
                   method="POST")


NPM_ENV = {"npm_config_cache": "/tmp/npm-cache", "npm_config_update_notifier": "false",
           "npm_config_audit": "false", "npm_config_fund": "false", "npm_config_loglevel": "warn"}


@pytest.fixture(scope="module")
def npm(env):
    """The host's node and npm in the shared folder (the guest image has neither)."""
    node, npm_dir = shutil.which("node"), "/usr/lib/node_modules/npm"
    if node is None or not os.path.isdir(npm_dir):
        pytest.skip("no node/npm on this host to run in the guest")
    dst = env.sandbox.folder / "nodejs"
    dst.mkdir(exist_ok=True)
    shutil.copy2(os.path.realpath(node), dst / "node")
    if not (dst / "npm").exists():
        shutil.copytree(npm_dir, dst / "npm", symlinks=True)
    return f"{dst}/node {dst}/npm/bin/npm-cli.js"


def test_npm_with_the_npm_preset(env, npm):
    r, rows = run(env, "npm", f"set -e; mkdir -p /tmp/npm-pack; cd /tmp/npm-pack; "
                  f"{npm} view capsem-hello-npm version; {npm} pack capsem-hello-npm; ls", env=NPM_ENV)
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "1.0.0" in r.stdout and "capsem-hello-npm-1.0.0.tgz" in r.stdout
    http = assert_only(rows, "npm")
    assert {r["host"] for r in http} == {"registry.npmjs.org"}
    # a scoped package: npm asks for /@capsem%2fhello-scoped (paths.CanonicalPath.two_readings)
    r, rows = run(env, "npm scoped", f"set -e; cd /tmp/npm-pack; {npm} view @capsem/hello-scoped version; "
                  f"{npm} pack @capsem/hello-scoped; ls", env=NPM_ENV)
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "capsem-hello-scoped-1.0.0.tgz" in r.stdout
    assert_only(rows, "npm")
    assert ("GET", "registry.npmjs.org", "/@capsem%2Fhello-scoped") in env.regs.seen
    # other encoded-slash spellings stay refused (double encoding; more than the one '/')
    for path in ("/@capsem%252fhello-scoped", "/@capsem%2f..%2fhello-scoped"):
        status, rows = curl_status(env, "--path-as-is https://registry.npmjs.org" + path)
        assert status == "403" and any(r["code"] in ("ambiguous-path", "doh") for r in rows), (path, rows)
    assert_refused(env, "https://registry.yarnpkg.com/capsem-hello-npm", "default-deny")
    assert_refused(env, "https://registry.npmjs.org/-/npm/v1/security/advisories/bulk", "default-deny",
                   method="POST")

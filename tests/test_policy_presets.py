"""The presets (issue 22) by their rules: what each lets through, and that its neighbours (other
hosts, paths, methods, schemes) stay denied. Real clients against local stand-ins are not here."""

from __future__ import annotations

import pytest

from capsem_vm.policy import parse_policy
from capsem_vm.policy.presets import PRESETS

ALLOWED = {
    "conda": [("GET", "https://repo.anaconda.com/pkgs/main/linux-64/repodata.json"),
              ("GET", "https://repo.anaconda.com/pkgs/r/noarch/repodata.json.zst"),
              ("HEAD", "https://conda.anaconda.org/conda-forge/noarch/x-1.0-py_0.conda")],
    "conda-forge": [("GET", "https://conda.anaconda.org/conda-forge/linux-64/repodata.json")],
    "npm": [("GET", "https://registry.npmjs.org/left-pad"),
            ("GET", "https://registry.npmjs.org/@types/node"),
            ("GET", "https://registry.npmjs.org/left-pad/-/left-pad-1.3.0.tgz")],
    "cran": [("GET", "https://cloud.r-project.org/src/contrib/PACKAGES.rds"),
             ("GET", "https://cloud.r-project.org/src/contrib/ggplot2_3.5.1.tar.gz"),
             ("GET", "https://cran.r-project.org/src/contrib/Archive/x/x_1.0.tar.gz"),
             ("GET", "https://cloud.r-project.org/bin/windows/contrib/4.4/PACKAGES")],
    "huggingface-models": [("GET", "https://huggingface.co/api/models/openai/whisper-tiny/revision/main"),
                           ("HEAD", "https://huggingface.co/openai/whisper-tiny/resolve/main/config.json"),
                           ("GET", "https://cas-bridge.xethub.hf.co/xet-bridge-us/abc"),
                           ("GET", "https://cdn-lfs.huggingface.co/repos/aa/bb/cc")],
    "huggingface-datasets": [("GET", "https://huggingface.co/api/datasets/squad/revision/main"),
                             ("HEAD", "https://huggingface.co/datasets/squad/resolve/main/x.parquet"),
                             ("POST", "https://huggingface.co/api/datasets/squad/paths-info/main"),
                             ("GET", "https://cdn-lfs-us-1.hf.co/repos/aa/bb")],
    "openai": [("POST", "https://api.openai.com/v1/chat/completions"), ("GET", "https://api.openai.com/v1/models")],
    "anthropic": [("POST", "https://api.anthropic.com/v1/messages")],
    "gemini": [("POST", "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent"),
               ("POST", "https://generativelanguage.googleapis.com/upload/v1beta/files")],
    "mistral": [("POST", "https://api.mistral.ai/v1/chat/completions")],
    "debian": [("GET", "http://deb.debian.org/debian/dists/bookworm/InRelease"),
               ("GET", "https://deb.debian.org/debian/pool/main/h/hello/hello_2.10-3_amd64.deb"),
               ("GET", "http://deb.debian.org/debian-security/dists/bookworm-security/InRelease"),
               ("GET", "http://security.debian.org/debian-security/dists/bookworm-security/InRelease")],
    "ubuntu": [("GET", "http://archive.ubuntu.com/ubuntu/dists/noble/InRelease"),
               ("GET", "http://security.ubuntu.com/ubuntu/dists/noble-security/InRelease"),
               ("GET", "http://ports.ubuntu.com/ubuntu-ports/dists/noble/InRelease")],
}

DENIED = {
    "conda": [("GET", "https://repo.anaconda.com/pkgs/free/linux-64/repodata.json"),   # not a default channel now
              ("GET", "https://conda.anaconda.org/bioconda/linux-64/repodata.json"),   # another channel
              ("POST", "https://conda.anaconda.org/conda-forge/x"),
              ("GET", "http://repo.anaconda.com/pkgs/main/linux-64/repodata.json"),
              ("GET", "https://anaconda.org/conda-forge/numpy")],
    "conda-forge": [("GET", "https://repo.anaconda.com/pkgs/main/linux-64/repodata.json"),
                    ("GET", "https://conda.anaconda.org/pytorch/linux-64/repodata.json")],
    "npm": [("PUT", "https://registry.npmjs.org/left-pad"),                          # publish
            ("POST", "https://registry.npmjs.org/-/npm/v1/security/advisories/bulk"),  # audit
            ("GET", "http://registry.npmjs.org/left-pad"),
            ("GET", "https://registry.yarnpkg.com/left-pad"),
            ("GET", "https://npmjs.org/left-pad")],
    "cran": [("GET", "https://cloud.r-project.org/web/packages/index.html"),
             ("POST", "https://cloud.r-project.org/src/contrib/x"),
             ("GET", "https://r-project.org/src/contrib/PACKAGES")],
    "huggingface-models": [("POST", "https://huggingface.co/api/models/x/y"),
                           ("PUT", "https://huggingface.co/api/repos/create"),
                           ("GET", "https://huggingface.co/api/spaces/x/y"),
                           ("POST", "https://cas-bridge.xethub.hf.co/x"),
                           ("GET", "https://huggingface.co/login"),
                           ("GET", "https://hf.co.evil.example/x/resolve/main/y")],
    "huggingface-datasets": [("POST", "https://huggingface.co/api/datasets/squad/commit/main"),
                             ("GET", "https://huggingface.co/api/models/x/y"),
                             ("POST", "https://huggingface.co/api/models/x/paths-info/main"),
                             ("DELETE", "https://huggingface.co/api/datasets/squad")],
    "openai": [("POST", "https://api.openai.com/v2/x"), ("DELETE", "https://api.openai.com/v1/files/x"),
               ("POST", "http://api.openai.com/v1/chat/completions"), ("POST", "https://openai.com/v1/x"),
               ("POST", "https://api.openai.com.evil.example/v1/x")],
    "anthropic": [("POST", "https://api.anthropic.com/v2/messages"), ("PUT", "https://api.anthropic.com/v1/x"),
                  ("POST", "https://console.anthropic.com/v1/messages")],
    "gemini": [("POST", "https://generativelanguage.googleapis.com/admin"),
               ("POST", "https://aiplatform.googleapis.com/v1beta/x"), ("DELETE", "https://generativelanguage.googleapis.com/v1beta/x")],
    "mistral": [("POST", "https://api.mistral.ai/v2/x"), ("POST", "https://codestral.mistral.ai/v1/fim/completions")],
    "debian": [("POST", "http://deb.debian.org/debian/x"), ("GET", "http://deb.debian.org/debian-ports/x"),
               ("GET", "http://ftp.debian.org/debian/dists/bookworm/InRelease"),
               ("GET", "http://security.debian.org/debian/x")],
    "ubuntu": [("GET", "http://archive.ubuntu.com/ubuntu-ports/x"), ("POST", "http://archive.ubuntu.com/ubuntu/x"),
               ("GET", "http://us.archive.ubuntu.com/ubuntu/dists/noble/InRelease"),
               ("GET", "http://ppa.launchpad.net/x/ubuntu/dists/noble/InRelease")],
}


def preset(name: str):
    return parse_policy(f'[[rule]]\ninclude = "{name}"\n', f"preset-{name}.toml")


def test_every_new_preset_has_examples_both_ways():
    assert set(ALLOWED) == set(DENIED)
    assert set(ALLOWED) <= set(PRESETS)
    assert set(PRESETS) - set(ALLOWED) == {"pypi", "github-clone", "huggingface"}  # tested in test_policy.py


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_preset_allows_what_the_client_needs(name):
    p = preset(name)
    for method, url in ALLOWED[name]:
        d = p.decide(method, url)
        assert d.allowed, (name, method, url, d)
        assert d.origin == f"preset {name}"


@pytest.mark.parametrize("name", sorted(DENIED))
def test_preset_neighbours_stay_denied(name):
    p = preset(name)
    for method, url in DENIED[name]:
        assert not p.decide(method, url).allowed, (name, method, url)


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_preset_rules_are_narrow(name):
    """No preset allows every host, writes (PUT/PATCH/DELETE), raw TCP, or a port besides 80/443;
    every allow rule names its methods."""
    for rule in preset(name).rules:
        if rule.origin != f"preset {name}" or rule.action != "allow":
            continue
        assert rule.host.kind != "any" and rule.methods, rule
        assert not rule.methods & {"PUT", "PATCH", "DELETE", "CONNECT", "*"}, rule
        assert rule.schemes and rule.schemes <= {"http", "https"} and rule.ports is None, rule
        assert not rule.addresses, rule


def test_presets_do_not_open_a_host_at_dns_or_connect_time_beyond_their_hosts():
    p = preset("openai")
    assert p.decide_connect("api.openai.com", 443).allowed
    assert not p.decide_connect("api.openai.com", 80).allowed
    assert not p.decide_connect("files.openai.com", 443).allowed


def test_scoped_npm_names_as_npm_escapes_them_pass_the_npm_preset():
    """npm asks for a scoped package as `/@scope%2fname` (an encoded '/'). It used to be refused as an
    ambiguous path by the built-in DoH path rule; its two readings are now judged instead
    (paths.CanonicalPath.two_readings; every other encoded-slash spelling: test_policy_npm_scoped.py)."""
    d = preset("npm").decide("GET", "https://registry.npmjs.org/@types%2fnode")
    assert d.allowed and d.rule == "npm-registry"

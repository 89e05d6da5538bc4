"""Local stand-ins for public package registries (no tests here), served on this machine only.

One random loopback address (127.a.b.c) listens on 443 (HTTPS, a leaf certificate from a test CA for
every stand-in name) and 80 (HTTP): the registries' default URLs work unchanged once the proxy's
static `resolve` map sends their real names there (never /etc/hosts). Each stand-in answers by Host:

    PyPI         pypi.org /simple/<project>/, files.pythonhosted.org /packages/<sha>/<wheel>
    Debian       deb.debian.org /debian/dists/capsemtest/..., /debian/pool/... (one .deb, unsigned:
                 the guest's sources list says [trusted=yes])
    Hugging Face huggingface.co /<repo>/resolve/<rev>/<file> (HEAD/GET, 302 to the CDN with the
                 X-Repo-Commit / X-Linked-Etag / X-Linked-Size headers huggingface_hub reads),
                 cdn-lfs.hf.co /repos/... (the bytes)
    npm          registry.npmjs.org /<name> and /@scope%2fname (packuments), /<name>/-/<file>.tgz

`preset_policy(names, addr)` is the policy of the named presets exactly as
capsem_vm.policy.presets has them, each rule given `addresses = [addr]` (and nothing else): the
stand-ins live on loopback, which no rule reaches unless it names the address.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.metadata as md
import io
import json
import random
import re
import ssl
import subprocess
import tarfile
import zipfile
from pathlib import Path

import tornado.httpserver
import tornado.netutil
import tornado.web
from cryptography.hazmat.primitives import serialization

from proxy_helpers import make_ca, make_leaf, write_pem

PYPI_NAMES = ("pypi.org", "files.pythonhosted.org")
DEBIAN_NAMES = ("deb.debian.org",)
HF_NAMES = ("huggingface.co", "cdn-lfs.hf.co")
NPM_NAMES = ("registry.npmjs.org",)
# neighbours: names that resolve to the stand-ins too, so a refusal is the policy's, not DNS's
NEIGHBOUR_NAMES = ("test.pypi.org", "ftp.debian.org", "hub.hf.example.co", "registry.yarnpkg.com")
ALL_NAMES = PYPI_NAMES + DEBIAN_NAMES + HF_NAMES + NPM_NAMES + NEIGHBOUR_NAMES

DEB_SUITE = "capsemtest"
HF_REPO, HF_FILE, HF_COMMIT = "capsem/tiny-model", "config.json", "a" * 40
HF_BODY = b'{"model_type": "capsem-tiny", "hidden_size": 8}\n'


def random_loopback() -> str:
    """127.a.b.c, not 127.0.0.1: ports 80/443 without taking the usual loopback address's."""
    return "127.%d.%d.%d" % (random.randint(1, 254), random.randint(1, 254), random.randint(2, 254))


# --- policy -------------------------------------------------------------------------------------

def _toml(v) -> str:
    # JSON strings and lists of strings are valid TOML basic strings / arrays
    return json.dumps(v)


def preset_policy(names: list[str], addr: str) -> str:
    """The presets' rules verbatim, each with `addresses = [addr]` added."""
    from capsem_vm.policy.presets import PRESETS
    out = []
    for name in names:
        for rule in PRESETS[name]:
            lines = ["[[rule]]"] + [f"{k} = {_toml(v)}" for k, v in rule.items()]
            lines.append(f"addresses = {_toml([addr])}")
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


# --- PyPI ---------------------------------------------------------------------------------------

def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_from_installed(dist_name: str) -> tuple[str, bytes]:
    """(filename, bytes) of a wheel rebuilt from an installed distribution of the host's venv (its
    RECORD's files and the original WHEEL tags): real packages for the guest without any registry."""
    dist = md.distribution(dist_name)
    tags = [line.split(":", 1)[1].strip() for line in (dist.read_text("WHEEL") or "").splitlines()
            if line.startswith("Tag:")]
    tag = tags[0] if tags else "py3-none-any"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for f in dist.files or ():
            s = str(f)
            if s.startswith("..") or "__pycache__" in s or s.endswith(".pyc"):
                continue
            path = Path(dist.locate_file(f))
            if path.is_file():
                z.write(path, s)
    name = dist.metadata["Name"].replace("-", "_")
    return f"{name}-{dist.version}-{tag}.whl", buf.getvalue()


def requirement_closure(root: str) -> list[str]:
    """The installed distributions `root` needs on this Python (markers evaluated, extras left out)."""
    from packaging.requirements import Requirement
    seen: dict[str, None] = {}
    todo = [root]
    while todo:
        name = _norm(todo.pop())
        if name in seen:
            continue
        seen[name] = None
        for req in md.distribution(name).requires or ():
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return list(seen)


class PyPI:
    """pypi.org's simple index and files.pythonhosted.org for a set of wheels."""

    def __init__(self, wheels: dict[str, bytes]):
        self.files = {}  # path -> bytes
        self.projects: dict[str, list[tuple[str, str, str]]] = {}
        for fname, data in wheels.items():
            sha = hashlib.sha256(data).hexdigest()
            path = f"/packages/{sha[:2]}/{sha[2:4]}/{sha[4:]}/{fname}"
            self.files[path] = data
            self.projects.setdefault(_norm(fname.split("-")[0]), []).append((fname, path, sha))

    def answer(self, h, host, path):
        if host == "pypi.org" and path.startswith("/simple/"):
            links = self.projects.get(_norm(path[len("/simple/"):].strip("/")))
            if links is None:
                return h.send_error(404)
            h.write("<html><body>" + "".join(
                f'<a href="https://files.pythonhosted.org{p}#sha256={s}">{f}</a>' for f, p, s in links)
                + "</body></html>")
        elif host == "files.pythonhosted.org" and path in self.files:
            h.set_header("Content-Type", "application/octet-stream")
            h.write(self.files[path])
        else:
            h.send_error(404)


# --- Debian -------------------------------------------------------------------------------------

def build_deb(tmp: Path, name: str = "capsem-hello-deb", version: str = "1.0") -> tuple[str, bytes, str]:
    """A tiny .deb built with dpkg-deb: (filename, bytes, its control text)."""
    root = tmp / f"{name}-build"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr/share/capsem-hello").mkdir(parents=True)
    (root / "usr/share/capsem-hello/hello.txt").write_text("hello from a .deb served by the test archive\n")
    control = (f"Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: capsem tests <t@test.example>\n"
               f"Description: capsem test package\n a tiny package for the apt preset test\n")
    (root / "DEBIAN/control").write_text(control)
    out = tmp / f"{name}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(out)],
                   check=True, capture_output=True)
    return out.name, out.read_bytes(), control


class DebianArchive:
    """deb.debian.org/debian with one suite, one component, one package (no signature: the guest's
    sources list marks it [trusted=yes])."""

    def __init__(self, tmp: Path):
        fname, deb, control = build_deb(tmp)
        self.deb_name = fname
        pool = f"pool/main/c/capsem-hello-deb/{fname}"
        packages = (control.split("Description:")[0] + f"Filename: {pool}\nSize: {len(deb)}\n"
                    f"SHA256: {hashlib.sha256(deb).hexdigest()}\nDescription:" + control.split("Description:")[1])
        pk = packages.encode()
        pkgz = gzip.compress(pk, mtime=0)
        idx = {"main/binary-amd64/Packages": pk, "main/binary-amd64/Packages.gz": pkgz}
        release = (f"Origin: capsem-test\nSuite: {DEB_SUITE}\nCodename: {DEB_SUITE}\n"
                   f"Date: Wed, 02 Dec 2026 00:00:00 UTC\nArchitectures: amd64 all\nComponents: main\nSHA256:\n"
                   + "".join(f" {hashlib.sha256(b).hexdigest()} {len(b)} {p}\n" for p, b in idx.items()))
        base = f"/debian/dists/{DEB_SUITE}/"
        self.files = {base + p: b for p, b in idx.items()}
        self.files[base + "Release"] = release.encode()
        self.files["/debian/" + pool] = deb

    def answer(self, h, host, path):
        if host == "deb.debian.org" and path in self.files:
            h.set_header("Content-Type", "application/octet-stream")
            h.write(self.files[path])
        else:
            h.send_error(404)


# --- Hugging Face -------------------------------------------------------------------------------

class HuggingFace:
    """huggingface.co's resolve endpoint (302 to the CDN, the metadata in headers) and the CDN."""

    def __init__(self):
        self.etag = hashlib.sha256(HF_BODY).hexdigest()
        self.cdn_path = f"/repos/ca/fe/{self.etag}"

    def answer(self, h, host, path):
        if host == "huggingface.co" and path in (f"/{HF_REPO}/resolve/main/{HF_FILE}",
                                                 f"/{HF_REPO}/resolve/{HF_COMMIT}/{HF_FILE}"):
            h.set_status(302)
            h.set_header("Location", f"https://cdn-lfs.hf.co{self.cdn_path}")
            h.set_header("X-Repo-Commit", HF_COMMIT)
            h.set_header("X-Linked-Etag", f'"{self.etag}"')
            h.set_header("ETag", f'"{self.etag}"')
            h.set_header("X-Linked-Size", str(len(HF_BODY)))
        elif host == "cdn-lfs.hf.co" and path == self.cdn_path:
            h.set_header("Content-Type", "application/octet-stream")
            h.set_header("ETag", f'"{self.etag}"')
            if h.request.method == "HEAD":
                h.set_header("Content-Length", str(len(HF_BODY)))
            else:
                h.write(HF_BODY)
        else:
            h.send_error(404)


# --- npm ----------------------------------------------------------------------------------------

def npm_tarball(name: str, version: str) -> bytes:
    pkg = json.dumps({"name": name, "version": version, "main": "index.js"}).encode()
    idx = f"module.exports = 'hello from {name}';\n".encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for fname, data in (("package/package.json", pkg), ("package/index.js", idx)):
            info = tarfile.TarInfo(fname)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Npm:
    """registry.npmjs.org: packuments and tarballs for an unscoped and a scoped package."""

    PACKAGES = ("capsem-hello-npm", "@capsem/hello-scoped")

    def __init__(self):
        self.docs, self.tarballs = {}, {}
        for name in self.PACKAGES:
            base = name.split("/")[-1]
            tgz = npm_tarball(name, "1.0.0")
            tpath = f"/{name}/-/{base}-1.0.0.tgz"
            self.tarballs[tpath] = tgz
            integrity = "sha512-" + base64.b64encode(hashlib.sha512(tgz).digest()).decode()
            self.docs[name] = {
                "name": name, "dist-tags": {"latest": "1.0.0"},
                "versions": {"1.0.0": {"name": name, "version": "1.0.0", "dist": {
                    "tarball": f"https://registry.npmjs.org{tpath}", "integrity": integrity,
                    "shasum": hashlib.sha1(tgz).hexdigest()}}}}

    def answer(self, h, host, path):
        if host != "registry.npmjs.org":
            return h.send_error(404)
        from urllib.parse import unquote
        name = unquote(path[1:]) if path.count("/") == 1 else None
        if name in self.docs:
            h.set_header("Content-Type", "application/json")
            h.write(json.dumps(self.docs[name]))
        elif path in self.tarballs:
            h.set_header("Content-Type", "application/octet-stream")
            h.write(self.tarballs[path])
        else:
            h.send_error(404)


# --- the server ---------------------------------------------------------------------------------

class Registries:
    """All stand-ins on `addr` ports 443 and 80; `seen` lists (method, host, raw path) served."""

    def __init__(self, tmp: Path, addr: str, upstream_ca_file: str | Path, wheels: dict[str, bytes]):
        self.addr = addr
        self.seen: list[tuple[str, str, str]] = []
        self.sites = {}
        self.pypi, self.debian, self.hf, self.npm = PyPI(wheels), DebianArchive(tmp), HuggingFace(), Npm()
        for names, site in ((PYPI_NAMES, self.pypi), (DEBIAN_NAMES, self.debian), (HF_NAMES, self.hf),
                            (NPM_NAMES, self.npm)):
            for n in names:
                self.sites[n] = site
        ca_key, ca_cert = make_ca("capsem test registries CA")
        key, leaf = make_leaf(ca_key, ca_cert, list(ALL_NAMES), [addr])
        cert, keyf = write_pem(tmp / "registries.pem", cert=leaf), write_pem(tmp / "registries.key", key=key)
        with open(upstream_ca_file, "ab") as f:  # the proxy trusts the test CA for upstreams
            f.write(ca_cert.public_bytes(serialization.Encoding.PEM))
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, keyf)
        regs = self

        class Handler(tornado.web.RequestHandler):
            SUPPORTED_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE")

            def _do(self, _=None):
                host = self.request.host_name
                raw = self.request.path  # undecoded: npm's scoped names arrive as /@scope%2fname
                regs.seen.append((self.request.method, host, raw))
                site = regs.sites.get(host)
                if site is None or self.request.method not in ("GET", "HEAD"):
                    return self.send_error(404)
                site.answer(self, host, raw)

            get = head = post = put = delete = _do

        app = tornado.web.Application([(r"/.*", Handler)])
        self.servers = []
        for port, opts in ((443, ctx), (80, None)):
            s = tornado.httpserver.HTTPServer(app, ssl_options=opts)
            s.add_sockets(tornado.netutil.bind_sockets(port, addr))
            self.servers.append(s)

    def resolve(self) -> dict[str, str]:
        return {n: self.addr for n in ALL_NAMES}

    def close(self):
        for s in self.servers:
            s.stop()

#!/usr/bin/env bash
# Prove capsem on another Debian host release: build (or reuse) a root of that release with its own
# QEMU, virtiofsd, vhost-device-vsock and Python (capsem's Python deps in a venv from PyPI), then run
# a command in it (pivot_root into it, with /dev, /proc, /sys, in a private mount and pid namespace), so no mount
# leaks onto the host's and nothing started in there outlives the command. Root only.
#
#   other-release.sh RELEASE build          build (or find) the root; prints its path on stdout
#   other-release.sh RELEASE run CMD...     run CMD in the root, in this checkout (mounted read-only),
#                                           with the host's VM images (read-only) and a fresh /tmp, /run, HOME
#   other-release.sh RELEASE versions       the release's QEMU, virtiofsd, vhost-device-vsock, Python
#
# The root is cached in /var/cache/capsem/hostroots/RELEASE-KEY, KEY a hash of this script's
# package lists (so a changed list builds a new root). Only the host's Debian mirror and PyPI are
# reached, at build time (pip trusts what the host's pip trusts: $PIP_CERT or the host's CA bundle,
# copied in for the build only); what runs inside only talks to this machine.
set -euo pipefail

RELEASE=${1:?usage: other-release.sh RELEASE build|run CMD...|versions}
ACTION=${2:?usage: other-release.sh RELEASE build|run CMD...|versions}
shift 2
HERE=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${CAPSEM_HOSTROOT_CACHE:-/var/cache/capsem/hostroots}

# the release's own host programs (virtiofsd: the Rust one, a package of its own from trixie on)
PACKAGES=(qemu-system-x86 virtiofsd python3 python3-venv ca-certificates mount procps)
# vhost-device-vsock is only in Debian's unstable suite (not in bookworm nor trixie): fetched from
# there as scripts/setup-system.sh does (needs only libc6 >= 2.34)
VSOCK_SUITE=sid
# capsem's run-time deps (pyproject.toml) and what its VM, kernel and egress tests import
PIP=("jupyter_client>=8.6,<9" "ipykernel>=6.29,<8" "traitlets>=5.14,<6" "pyzmq>=25,<28"
     "qemu.qmp>=0.0.3,<0.1" "cryptography>=41" "platformdirs>=3"
     "pytest>=8,<9" "pytest-timeout>=2.3" "pytest-asyncio>=0.23,<1" "hypothesis>=6.100" h2 tornado
     "nbclient>=0.10" "nbformat>=5.10" requests)
# the egress proxy's own env, exactly capsem_vm/proxy/service.py PROXY_REQUIREMENTS (what `capsem setup`
# installs): on 3.12/3.13 with uvloop >= 0.22 the service must fall back to asyncio's loop itself
# (proxy/tuning.py), which this root proves on Python 3.13
# (environment markers: pip picks mitmproxy 12.x on the release's Python >= 3.12; tests/test_setup_plan.py
# checks this list against PROXY_REQUIREMENTS)
PROXY_PIP=("mitmproxy==11.0.2; python_version < '3.12'" "mitmproxy==12.3.1; python_version >= '3.12'"
           "platformdirs>=3" "uvloop>=0.19")

if [ "$(id -u)" != 0 ]; then
  echo "other-release: must run as root (mmdebstrap --mode=root, chroot, mounts)" >&2
  exit 1
fi

KEY=$(printf '%s\n' "v1" "$RELEASE" "${PACKAGES[*]}" "$VSOCK_SUITE" "${PIP[*]}" "${PROXY_PIP[*]}" \
      | sha256sum | cut -c1-16)
ROOT="$CACHE/$RELEASE-$KEY"

mirror() {  # the host's Debian mirror (as scripts/setup-system.sh finds it)
  local m
  m=$( (cat /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null || true) \
       | grep -v '^#' | grep -oE 'https?://[^ ]*/debian/?( |$)' | head -n1 | tr -d ' ' || true)
  m=${m:-http://deb.debian.org/debian}
  echo "${m%/}"
}

fetch_vsock_deb() {  # $1: dir to download into (private apt state: the system's sources stay untouched)
  local work=$1
  mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $(mirror) $VSOCK_SUITE main" > "$work/sources.list"
  local opts=(-o Dir::Etc::sourcelist="$work/sources.list" -o Dir::Etc::sourceparts=/dev/null
              -o Dir::State::Lists="$work/lists" -o Dir::Cache="$work/cache" -o Dir::State::status=/dev/null
              -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
  apt-get "${opts[@]}" -qq update
  (cd "$work" && apt-get "${opts[@]}" -qq download vhost-device-vsock)
}

build() {
  mkdir -p "$CACHE"
  exec 9> "$CACHE/.lock-$RELEASE"  # one builder per release at a time; a waiting one then finds it cached
  flock 9
  build_locked
  chroot "$ROOT" python3 -c "$ENTRY_POINTS" < "$HERE/pyproject.toml"
  exec 9>&-  # not held by what runs in the root
}

build_locked() {
  if [ -e "$ROOT/.capsem-hostroot-complete" ]; then
    echo "other-release: $RELEASE root cached at $ROOT" >&2
    return
  fi
  local work start
  work=$(mktemp -d "$CACHE/.build-$RELEASE.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" EXIT
  start=$(date +%s)
  echo "other-release: building the $RELEASE root (mirror $(mirror), PyPI) into $ROOT" >&2
  fetch_vsock_deb "$work/vsock"
  local deb venvs
  deb=$(ls "$work"/vsock/vhost-device-vsock_*.deb)
  venvs="python3 -m venv /opt/capsem/.venv && /opt/capsem/.venv/bin/pip install -q --no-cache-dir $(printf "'%s' " "${PIP[@]}")"
  venvs+=" && python3 -m venv /opt/capsem/.venv-proxy && /opt/capsem/.venv-proxy/bin/pip install -q --no-cache-dir $(printf "%q " "${PROXY_PIP[@]}")"  # %q: the markers hold quotes
  # its own mount namespace: the mounts mmdebstrap makes in the root (dev/pts, proc, sys) go with it
  # even when it is killed, instead of staying on the host under $work
  unshare --mount --propagation private \
  mmdebstrap --variant=minbase --mode=root --aptopt='APT::Install-Recommends "false"' \
    --include="$(IFS=,; echo "${PACKAGES[*]}")" \
    --customize-hook="copy-in $deb /tmp" \
    --customize-hook="chroot \"\$1\" dpkg -i /tmp/$(basename "$deb")" \
    --customize-hook='cp -L /etc/resolv.conf "$1"/etc/resolv.conf' \
    --customize-hook="cp -L ${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt} \"\$1\"/tmp/build-ca.pem" \
    --customize-hook="chroot \"\$1\" env -u PIP_FIND_LINKS PIP_CERT=/tmp/build-ca.pem SSL_CERT_FILE=/tmp/build-ca.pem sh -c \"$venvs\"" \
    --customize-hook='rm -f "$1"/etc/resolv.conf "$1"/tmp/*.deb "$1"/tmp/build-ca.pem; rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/root/.cache' \
    "$RELEASE" "$work/root" "deb $(mirror) $RELEASE main" >&2
  touch "$work/root/.capsem-hostroot-complete"
  rm -rf "$ROOT" "$CACHE/$RELEASE"-*  # and this release's roots of older package lists
  mv "$work/root" "$ROOT"
  echo "other-release: $RELEASE root built in $(( $(date +%s) - start )) s ($(du -sh "$ROOT" | cut -f1))" >&2
}

# Runs inside `unshare --mount --pid --fork`: mounts made here vanish with the namespace. pivot_root,
# not chroot: the kernel refuses user namespaces (which capsem's virtiofsd confinement makes) to a
# process whose root is not its mount namespace's root.
INNER='set -e
R=$1; CO=$2; shift 2
mount --make-rprivate /
mount --bind "$R" "$R"
mount --rbind /dev "$R/dev"
mount --rbind /sys "$R/sys"
mount -t proc proc "$R/proc"
mount -t tmpfs -o mode=1777 tmpfs "$R/tmp"
mount -t tmpfs -o mode=0755 tmpfs "$R/run"
mount -t tmpfs -o mode=0700 tmpfs "$R/root"  # a fresh HOME: the CA, audit DB and caches of capsem die with the run
mkdir -p "$R/var/cache/capsem" "$R$CO"
for d in /var/cache/capsem/images /var/cache/capsem/layers; do
  [ -d "$d" ] || continue
  mkdir -p "$R$d" && mount --bind "$d" "$R$d" && mount -o remount,bind,ro "$R$d"
done
mount --bind "$CO" "$R$CO" && mount -o remount,bind,ro "$R$CO"
cd "$R" && pivot_root . mnt && umount -l /mnt  # from here on only the release root is visible
exec /usr/bin/env -i PATH=/opt/capsem/.venv/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
  LANG=C.UTF-8 TERM=dumb PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$CO:$CO/guest-agent" \
  CAPSEM_PROXY_PYTHON=/opt/capsem/.venv-proxy/bin/python ${CAPSEM_ENV:-} sh -c "cd \"\$0\" && exec \"\$@\"" "$CO" "$@"'

# The checkout's entry points (the kernel provisioner, the `capsem` script) as an installed package
# would declare them, read from its pyproject.toml; the code itself comes from PYTHONPATH.
ENTRY_POINTS='import glob, os, sys, tomllib
p = tomllib.loads(sys.stdin.read())["project"]
groups = {"console_scripts": p.get("scripts", {}), **p.get("entry-points", {})}
d = glob.glob("/opt/capsem/.venv/lib/python3*/site-packages")[0] + "/capsem_jupyter-0+checkout.dist-info"
os.makedirs(d, exist_ok=True)
open(d + "/METADATA", "w").write("Metadata-Version: 2.1\nName: capsem-jupyter\nVersion: 0+checkout\n")
open(d + "/entry_points.txt", "w").write("".join(f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n"
                                                 for g, eps in groups.items()))
open(d + "/RECORD", "w").write("")'

run() {
  build
  unshare --mount --pid --fork --propagation private -- bash -c "$INNER" inner "$ROOT" "$HERE" "$@"
}

case "$ACTION" in
  build) build; echo "$ROOT" ;;
  run) run "$@" ;;
  versions)
    run sh -c 'qemu-system-x86_64 --version | head -n1; /usr/libexec/virtiofsd --version;
               vhost-device-vsock --version; python3 --version;
               /opt/capsem/.venv-proxy/bin/python -c "import mitmproxy.version as v; print(\"mitmproxy\", v.VERSION)"' ;;
  *) echo "other-release: unknown action $ACTION" >&2; exit 2 ;;
esac

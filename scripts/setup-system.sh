#!/usr/bin/env bash
# Installs the host programs capsem needs, all from Debian packages. Idempotent; run as root.
# vhost-device-vsock is not in bookworm: it is fetched from Debian's unstable suite with a private
# apt state dir (the system's sources stay untouched) and unpacked under /opt/capsem.
set -euo pipefail

PACKAGES=(qemu-system-x86 qemu-utils busybox-static debootstrap mmdebstrap erofs-utils cpio zstd
          debian-archive-keyring ca-certificates socat kmod uidmap util-linux
          python3-venv make
          nodejs chromium)  # nodejs: builds the JupyterLab extension; chromium: the browser tests
PREFIX=/opt/capsem
VSOCK_BIN="$PREFIX/bin/vhost-device-vsock"

if [ "$(id -u)" != 0 ]; then
  echo "setup-system: must run as root (it installs Debian packages)." >&2
  exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup-system: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# npm comes with NodeSource's nodejs; Debian's nodejs has it as a separate package
if ! command -v npm >/dev/null; then
  echo "setup-system: installing npm"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm
fi

if [ ! -x "$VSOCK_BIN" ]; then
  echo "setup-system: fetching vhost-device-vsock from Debian unstable"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  mirror=$( (cat /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null || true) \
           | grep -v '^#' | grep -oE 'https?://[^ ]*/debian/?( |$)' | head -n1 | tr -d ' ' || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${mirror%/} sid main" > "$work/sources.list"
  opts=(-o Dir::Etc::sourcelist="$work/sources.list" -o Dir::Etc::sourceparts=/dev/null
        -o Dir::State::Lists="$work/lists" -o Dir::Cache="$work/cache" -o Debug::NoLocking=1)
  apt-get "${opts[@]}" update -qq
  (cd "$work" && apt-get "${opts[@]}" download vhost-device-vsock)
  dpkg -x "$work"/vhost-device-vsock_*.deb "$work/root"
  install -D -m 0755 "$work/root/usr/bin/vhost-device-vsock" "$VSOCK_BIN"
fi
"$VSOCK_BIN" --version
echo "setup-system: done"

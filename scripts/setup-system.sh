#!/usr/bin/env bash
# `make system`: the host packages capsem needs, and what working on it needs (make, nodejs, npm,
# chromium), as `capsem setup --dev --no-proxy-env --no-image` does. It runs before any venv exists:
# capsem_vm.setup's packages part needs only the standard library, so the system's python3 runs it
# from this checkout. Idempotent; installing needs root (as a normal user it lists what root must run).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v python3 >/dev/null; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup-system: python3 is missing; as root: apt-get install python3" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3
fi
exec python3 -m capsem_vm.setup --dev --no-proxy-env --no-image "$@"

#!/usr/bin/env bash
# The unit tier (`make unit`): every test that needs no VM and no VM image, with an empty image cache
# (a test that needs the image but is not marked `vm` fails here, on every machine).
# Two passes: most tests on $UNIT_WORKERS xdist workers (the tier mostly waits on subprocesses and
# sockets, so two workers nearly halve it on 2 cores; --dist loadfile keeps a module and its
# module-scoped world on one worker, in order), then the tests marked `serial` one at a time, because
# they assert tight wall-clock bounds that a second worker beside them could break.
# Usage: scripts/unit-tier.sh PYTEST [pytest args...]
set -uo pipefail
pytest=$1; shift
workers=${UNIT_WORKERS:-2}
cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT
export CAPSEM_CACHE_DIR=$cache/user CAPSEM_SYSTEM_CACHE_DIR=$cache/system
start=$(date +%s)

# pytest's exit code 5 means "no test selected" (a -k that picks only one pass's tests): fine for one pass
"$pytest" -m "not vm and not slow and not serial" -n "$workers" --dist loadfile "$@"; parallel=$?
rc=$parallel
if [ $parallel = 0 ] || [ $parallel = 5 ]; then
    "$pytest" -m "not vm and not slow and serial" "$@"; serial=$?
    if [ $serial = 5 ]; then rc=$parallel; elif [ $parallel = 5 ] && [ $serial = 0 ]; then rc=0; else rc=$serial; fi
fi
echo "make unit: unit tier took $(( $(date +%s) - start ))s (exit $rc)"
exit $rc

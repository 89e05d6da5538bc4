"""Where a proxy worker's CPU goes, from py-spy samples: capsem's own checks and audit rows against
mitmproxy's own per-request machinery (which stock mitmproxy pays too).

    py-spy record -p PID -d 10 -r 200 --native -f raw -o capsem.txt   # during bench/proxy.py --only capsem
    .venv/bin/python bench/proxy_profile.py capsem.txt [stock-min.txt stock.txt ...] [--ms 0.44 0.53 ...]

py-spy is not a project dependency: install it in a scratch venv. Samples taken while a thread waits
(the audit writer's batch window, the event loop's poll) are left out; the others go to the first
bucket below that any frame of the sample matches. With --ms (the proxy CPU ms per request that
bench/proxy.py printed for each file, same order) each bucket is also given in ms per request.
"""

from __future__ import annotations

import argparse
import collections
import os
import re

BUCKETS = [  # (bucket, pattern on one frame); order matters: the first match wins
    ("garbage collector", r"gc_collect|collect_generations"),
    ("socket write syscalls (loopback TCP, both ends' kernel work)", r"^(write|send|sendmsg|writev) \(libc"),
    ("socket read syscalls", r"^(read|recv|recvmsg) \(libc"),
    ("TLS (OpenSSL, pyOpenSSL)", r"SSL_|OpenSSL/|libssl|libcrypto|_openssl"),
    ("capsem: audit writer thread (SQLite)", r"AuditLog\._run|sqlite"),
    ("capsem: audit rows (Audit addon, AuditLog.record)", r"Audit\.|AuditLog\.record"),
    ("capsem: checks (Guard, Credentials, Limits, Streams, policy)",
     r"capsem_vm/(proxy/addons|policy|proxy/scrub|proxy/placement|safetext|rate\.py)"),
    ("HTTP/1 head parsing (mitmproxy's, in capsem's size-cap wrapper)", r"read_headers \(capsem"),
    ("mitmproxy's stock addons", r"mitmproxy/addons/"),
    ("hook dispatch (addon manager)", r"addonmanager|CachedAddonManager|mitmproxy/hooks\.py"),
    ("task creation (one task per hook)", r"create_task|set_task_debug_info"),
    ("mitmproxy layers, connections, HTTP parsing", r"mitmproxy/"),
]
OTHER = "event loop, interpreter, other"
WAITING = re.compile(r"clock_nanosleep|pthread_cond_timedwait|pthread_cond_wait|epoll_wait|epoll_pwait")
_COMPILED = [(name, re.compile(p)) for name, p in BUCKETS]


def bucket(frames: list[str]) -> str | None:
    """The sample's bucket, or None for a sample of a waiting thread."""
    if any(WAITING.search(f) for f in frames[-3:]):
        return None
    for name, rx in _COMPILED:
        if any(rx.search(f) for f in frames):
            return name
    return OTHER


def count(path: str) -> tuple[collections.Counter, int]:
    counts: collections.Counter = collections.Counter()
    waiting = 0
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or " " not in line:
                continue
            stack, n = line.rsplit(" ", 1)
            b = bucket([fr.strip() for fr in stack.split(";")])
            if b is None:
                waiting += int(n)
            else:
                counts[b] += int(n)
    return counts, waiting


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="py-spy raw output (-f raw), one per proxy")
    ap.add_argument("--ms", type=float, nargs="*", default=[], help="proxy CPU ms per request of each file")
    args = ap.parse_args()
    results = [count(p) for p in args.files]
    names = [b for b, _ in BUCKETS] + [OTHER]
    width = max(map(len, names))
    print(" " * width + "".join(f"  {os.path.basename(p)[-24:]:>24}" for p in args.files))
    for name in names:
        cells = []
        for i, (c, _) in enumerate(results):
            share = c[name] / max(1, sum(c.values()))
            cells.append(f"{100 * share:5.1f}%" + (f" {share * args.ms[i]:.3f} ms" if i < len(args.ms) else ""))
        print(f"{name:<{width}}" + "".join(f"  {x:>24}" for x in cells))
    print(f"{'samples on CPU (waiting, left out)':<{width}}"
          + "".join(f"  {f'{sum(c.values())} ({w})':>24}" for c, w in results))


if __name__ == "__main__":
    main()

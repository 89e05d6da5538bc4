"""Living with many file descriptors: the process that runs capsem kernels (a Jupyter server, a
script with KernelManagers) holds about 60 per kernel (channel listeners and connections, vsock
streams, the agent's connection, QMP, pidfds, log pipes, jupyter_client's ZMQ sockets): 1,252 were
measured in bench/many.py's client process with 20 kernels started at once (569 for 20 local
ipykernels).

- raise_limit(): the soft RLIMIT_NOFILE is often 1024 (systemd's default 1024:524288 for user
  sessions and services), which 20 kernels exceed; raised to the hard limit (at most
  SOFT_LIMIT_CAP), once per process, before a kernel starts.
- readable(): whether a descriptor is readable, by poll(2). select(2) takes only numbers below
  FD_SETSIZE (1024): Python raises ValueError for a higher one, which such a process has.
"""

from __future__ import annotations

import logging
import math
import resource
import select

log = logging.getLogger(__name__)

SOFT_LIMIT_CAP = 1 << 20


def raise_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (capped); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = SOFT_LIMIT_CAP if hard == resource.RLIM_INFINITY else min(hard, SOFT_LIMIT_CAP)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return want
        except (OSError, ValueError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, want, exc)
    return soft


def readable(fd, timeout: float = 0.0) -> bool:
    """fd (a number or an object with fileno()) is readable, at its end or in error within
    `timeout` s (as select() would say), whatever its number."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(math.ceil(max(0.0, timeout) * 1000)))

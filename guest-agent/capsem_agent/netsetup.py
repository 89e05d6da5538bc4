"""Guest network plumbing for egress capture (root, in the VM only).

The guest has no NIC, only `lo`, so a connect() to an outside address would fail with
ENETUNREACH before netfilter ever saw it. So:

  - a dummy interface `capsem0` (192.0.0.8/32, RFC 7600's "IPv4 dummy address", which no real
    host uses: TEST-NET addresses were taken, e.g. by our CI hosts themselves) carries an IPv4
    default route: outside destinations become routable, and nothing leaves through it;
  - nftables, NAT OUTPUT: every TCP connection to a non-local address is redirected to the
    agent's capture port (127.0.0.1:15001), which reads SO_ORIGINAL_DST; DNS over UDP to any
    outside resolver (8.8.8.8:53) is redirected to the stub, so it gets the policy's answer and
    is audited like any other lookup (the outside resolver is never asked);
  - nftables, filter OUTPUT: only packets to local addresses pass (after NAT the redirected
    TCP has a local destination); UDP (but DNS to 127.0.0.1), ICMP, raw IP towards the outside
    are dropped, which a sender sees at once as EPERM ("Operation not permitted");
  - IPv6 is switched off (sysctl), and any IPv6 that remains is dropped;
  - /etc/resolv.conf names the stub resolver on 127.0.0.1.

`ip`, `nft` and `modprobe` come from the root filesystem (iproute2, nftables, kmod); the modules
ship on demand in the initramfs (capsem_vm/image/modules.py).
"""

from __future__ import annotations

import os
import subprocess
import time

DEVICE = "capsem0"
ADDRESS = "192.0.0.8"
CAPTURE_PORT = 15001
STEP_TIMEOUT = 60.0   # module loading under TCG beside a booting kernel took over 30 s once (CI)
MODULES = ("dummy", "nf_tables", "nft_chain_nat", "nft_redir", "nft_fib_ipv4")

RULESET = f"""\
table ip capsem
delete table ip capsem
table ip capsem {{
    chain nat_out {{
        type nat hook output priority -100; policy accept;
        fib daddr type local return
        meta l4proto tcp redirect to :{CAPTURE_PORT}
        udp dport 53 redirect to :53
    }}
    chain filter_out {{
        type filter hook output priority 0; policy drop;
        fib daddr type local accept
    }}
}}
table ip6 capsem6
delete table ip6 capsem6
table ip6 capsem6 {{
    chain filter_out {{
        type filter hook output priority 0; policy drop;
        oifname "lo" accept
    }}
}}
"""

IP_BATCH = f"""\
link add {DEVICE} type dummy
addr add {ADDRESS}/32 dev {DEVICE}
link set {DEVICE} up
route replace default dev {DEVICE} src {ADDRESS}
"""

RESOLV_CONF = """\
# written by the capsem agent: every name is resolved by the host's egress policy
nameserver 127.0.0.1
options timeout:2 attempts:2
"""

HOSTS = """\
127.0.0.1\tlocalhost capsem
"""


class NetSetupError(RuntimeError):
    pass


def _run(argv: list[str], stdin: str | None = None) -> None:
    try:
        res = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=STEP_TIMEOUT,
                             env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetSetupError(f"{argv[0]}: {exc}") from None
    if res.returncode != 0:
        raise NetSetupError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()[:1000]}")


def _write_sysctl(name: str, value: str) -> None:
    path = "/proc/sys/" + name.replace(".", "/")
    try:
        with open(path, "w") as f:
            f.write(value)
    except FileNotFoundError:
        pass  # e.g. IPv6 not built in: nothing to switch off


def _replace_file(path: str, text: str, mode: int = 0o644) -> None:
    tmp = f"{path}.capsem-tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)  # also replaces a symlink (e.g. to a resolved stub) by a plain file


def device_exists() -> bool:
    return os.path.exists(f"/sys/class/net/{DEVICE}")


def disable_ipv6() -> None:
    for scope in ("all", "default", "lo"):
        _write_sysctl(f"net.ipv6.conf.{scope}.disable_ipv6", "1")


def setup() -> dict[str, float]:
    """Idempotent: a second call re-applies the rules and files. Returns seconds per step."""
    times = {}
    t = time.monotonic()

    def lap(name):
        nonlocal t
        now = time.monotonic()
        times[name] = round(now - t, 3)
        t = now
    disable_ipv6()
    if not os.path.exists("/sys/module/dummy"):
        os.makedirs("/etc/modprobe.d", exist_ok=True)
        _replace_file("/etc/modprobe.d/capsem-dummy.conf", "options dummy numdummies=0\n")  # no stray dummy0
        _run(["modprobe", "-a", *MODULES])
    lap("modules")
    if not device_exists():
        _run(["ip", "-batch", "-"], IP_BATCH)
    lap("device")
    _run(["nft", "-f", "-"], RULESET)
    lap("nft")
    _replace_file("/etc/resolv.conf", RESOLV_CONF)
    try:
        with open("/etc/hosts") as f:
            hosts = f.read(65536)
    except OSError:
        hosts = ""
    if "localhost" not in hosts:
        _replace_file("/etc/hosts", HOSTS + hosts)
    return times

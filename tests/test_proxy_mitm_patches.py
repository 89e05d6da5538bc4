"""capsem_vm/proxy/mitm_patches.py: every patch of mitmproxy internals is applied by one call, once,
and only on a mitmproxy version the patches were checked against; an unknown version is refused
with a message saying what was found, what is known and what to do. Runs in the proxy venv (the
only one with mitmproxy), like the service itself."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

from capsem_agent import protocol
from capsem_vm.proxy.service import find_proxy_python

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout these tests run from

ENV = {"PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'guest-agent'}", "PATH": "/usr/bin:/bin"}


def _run_in_proxy_venv(script: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([find_proxy_python(), "-c", textwrap.dedent(script)], input=stdin,
                          capture_output=True, timeout=120, cwd=REPO_ROOT, env=ENV)


GATE = '''
    import asyncio
    from mitmproxy import certs, http, options
    from mitmproxy.addons import tlsconfig
    from mitmproxy.master import Master
    from mitmproxy.proxy import server as proxy_server
    from mitmproxy.proxy.layers.http import _http1
    from mitmproxy.utils import asyncio_utils
    from capsem_vm.proxy import mitm_patches as mp

    version = mp.check_version()
    internals = mp.KNOWN_VERSIONS[version]

    def idle_timeout(master):  # where this release keeps it
        return master.options.tcp_timeout if internals.idle_timeout_option else proxy_server.TCP_TIMEOUT

    def stock_state(master):
        return (http.MessageData.__post_init__, _http1.Http1Server.read_headers, idle_timeout(master),
                certs.CertStore.get_cert, tlsconfig.TlsConfig.__dict__.get("request"),
                asyncio_utils.set_eager_task_factory)

    async def main():
        real = mp.installed_version
        # near misses of the known versions and other releases: all refused, nothing patched
        for found in ("11.0.1", "11.0.3", "11.0", "11", "11.0.2.dev0", "11.0.2rc1", " 11.0.2", "12.0.0",
                      "12.3.0", "12.3.2", "12.3", "12.3.1rc1", "12.3.1 ", "13.0.0", "none", ""):
            mp.installed_version = lambda: found
            master = Master(options.Options())
            stock = stock_state(master)
            manager = master.addons
            try:
                mp.apply(master, idle_timeout=7, header_limit=lambda: 10)
            except mp.UnsupportedMitmproxy as exc:
                msg = str(exc)
            else:
                raise AssertionError(f"{found!r} was accepted")
            assert f"mitmproxy {found} is installed" in msg, msg
            assert all(v in msg for v in mp.KNOWN_VERSIONS), msg
            assert "make proxy-venv" in msg and "mitm_patches.py" in msg, msg
            assert master.addons is manager, "refused, yet the dispatcher was swapped"
            assert stock_state(master) == stock, "refused, yet something was patched"
        mp.installed_version = real

        master = Master(options.Options())
        stock = stock_state(master)
        stock_manager = master.addons
        refused = []
        mp.apply(master, idle_timeout=7, header_limit=lambda: 10, on_header_refused=refused.append)
        patched = (master.addons, http.MessageData.__post_init__, _http1.Http1Server.read_headers,
                   certs.CertStore.get_cert)
        assert isinstance(master.addons, mp.CachedAddonManager)
        receivers = [r() for r in master.options.changed.receivers]
        assert stock_manager._configure_all not in receivers and master.addons._configure_all in receivers
        assert http.MessageData.__post_init__ is mp._no_typecheck
        assert _http1.Http1Server.read_headers is not stock[1]
        assert _http1.Http1Server.read_headers._capsem_header_limit
        assert idle_timeout(master) == 7
        assert asyncio_utils.set_eager_task_factory is mp._lazy_tasks  # tasks run as on Python 3.11
        if internals.crl_points:  # 12.x: no CRL point in forged certificates, no CRL answered locally
            assert certs.CertStore.get_cert._capsem_no_crl and tlsconfig.TlsConfig.request is None
        else:  # 11.0.2 has neither: nothing of it touched
            assert (certs.CertStore.get_cert, tlsconfig.TlsConfig.__dict__.get("request")) == stock[3:5]
        mp.apply(master, idle_timeout=9, header_limit=lambda: 10)  # idempotent: nothing wrapped twice
        assert (master.addons, http.MessageData.__post_init__, _http1.Http1Server.read_headers,
                certs.CertStore.get_cert) == patched
        assert [r() for r in master.options.changed.receivers].count(master.addons._configure_all) == 1
        assert idle_timeout(master) == 9  # a setting, not a wrapper: the last value counts
        print("ok", version)
    asyncio.run(main())
'''


def test_an_unknown_mitmproxy_is_refused_and_the_known_one_gets_every_patch_once():
    out = _run_in_proxy_venv(GATE)
    assert out.returncode == 0 and out.stdout.decode().startswith("ok "), out.stderr.decode()[-3000:]


SERVICE = '''
    import importlib.metadata as md
    real = md.version
    md.version = lambda name: "12.9.9" if name == "mitmproxy" else real(name)
    from capsem_vm.proxy import server
    raise SystemExit(server.main())
'''


def test_the_service_process_refuses_an_unknown_mitmproxy_with_a_fatal_frame():
    """The gate sits before the service's first mitmproxy import: the parent gets the message as the
    service's fatal frame (shown in ProxyServiceError), not an ImportError from an internal."""
    out = _run_in_proxy_venv(SERVICE, stdin=protocol.encode({"t": "start"}))
    assert out.returncode == 2, out.stderr.decode()[-3000:]
    frames = list(protocol.FrameDecoder().feed(out.stdout))
    msg = protocol.decode_body(frames[0])
    assert msg["t"] == "fatal", msg
    assert msg["message"].startswith("UnsupportedMitmproxy: mitmproxy 12.9.9 is installed"), msg
    assert "11.0.2" in msg["message"] and "12.3.1" in msg["message"], msg
    assert "make proxy-venv" in msg["message"], msg


CRL = '''
    import asyncio, tempfile
    from mitmproxy import certs, options
    from mitmproxy.addons import tlsconfig
    from mitmproxy.http import HTTPFlow
    from mitmproxy.master import Master
    from mitmproxy.proxy.layers.http import HttpRequestHook
    from mitmproxy.test import tflow
    from capsem_vm.proxy import mitm_patches as mp

    internals = mp.KNOWN_VERSIONS[mp.check_version()]
    if not internals.crl_points:
        print("n/a")  # 11.0.2 has no CRL points to drop
        raise SystemExit(0)
    store = certs.CertStore.from_store(tempfile.mkdtemp(), "mitmproxy", 2048)
    upstream_crl = "http://upstream.example/mitmproxy-1.crl"
    # the stock release does what the patch removes (so this test fails without it)
    assert store.get_cert("a.example", [], None, upstream_crl).cert.crl_distribution_points == [upstream_crl]
    assert callable(tlsconfig.TlsConfig.request)

    async def main():
        master = Master(options.Options())
        mp.apply(master, idle_timeout=7, header_limit=lambda: 10)
        master.addons.add(tlsconfig.TlsConfig())
        # a forged certificate names no CRL point (a fresh name: the store caches per name)
        assert store.get_cert("b.example", [], None, upstream_crl).cert.crl_distribution_points == []
        # and nothing answers a request for one: it goes upstream like any other allowed request
        flow = tflow.tflow()
        flow.request.path = "/mitmproxy-%d.crl" % store.default_ca.serial
        await master.addons.handle_lifecycle(HttpRequestHook(flow))
        assert flow.response is None and not master.addons._handlers_for(HttpRequestHook(flow))
        print("ok")
    asyncio.run(main())
'''


def test_mitmproxy_12_forges_no_crl_point_and_answers_no_crl_request():
    """mitmproxy 12 puts a CRL distribution point into each forged certificate and answers requests
    for it itself; the patch keeps 11.0.2's behaviour (neither). On 11.0.2 there is nothing to check."""
    out = _run_in_proxy_venv(CRL)
    assert out.returncode == 0 and out.stdout.decode().strip() in ("ok", "n/a"), out.stderr.decode()[-3000:]


TASK_LABELS = '''
    import asyncio, os
    from mitmproxy import options
    from mitmproxy.master import Master
    from mitmproxy.utils import asyncio_utils
    from capsem_vm.proxy import mitm_patches as mp

    os.environ["PYTEST_CURRENT_TEST"] = "some test"  # 11.0.2's stock label looked this up per task

    async def main():
        mp.apply(Master(options.Options()), idle_timeout=7, header_limit=lambda: 10)
        async def nothing():
            return 1
        t = asyncio_utils.create_task(nothing(), name="handle_hook(request)", client=("10.0.0.1", 5))
        assert await t == 1
        assert t.get_name() == "handle_hook(request)", t.get_name()
        assert t.client == ("10.0.0.1", 5) and t.created > 0
        u = asyncio_utils.create_task(nothing(), name="x")
        await u
        assert not hasattr(u, "client")
        print("ok")
    asyncio.run(main())
'''


def test_hook_tasks_are_labelled_without_an_environment_lookup():
    """mitm_patches.cheap_task_debug_info: the label of every task mitmproxy starts (one per hook)
    is 12.x's (name, client, creation time), never a test runner's name read from os.environ."""
    out = _run_in_proxy_venv(TASK_LABELS)
    assert out.returncode == 0 and out.stdout.decode().strip() == "ok", out.stderr.decode()[-3000:]

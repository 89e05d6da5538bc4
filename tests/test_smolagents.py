"""smolagents' own CodeAgent on capsem_kernel.integrations.smolagents.CapsemExecutor, one real
capsem kernel (one VM) for the module, driven by a scripted model (canned steps, no LLM).

"The internet" is egress_world.World (api.test.example behind the real proxy service) plus a
package index standing in for PyPI's own hosts: pypi.org and files.pythonhosted.org resolve (the
proxy's static resolve map, nothing in /etc/hosts) to a random loopback address where a local
HTTPS server with a test CA serves one wheel (capsem-hello). The guest's pip uses its defaults:
pip's own index URL, through the proxy. Pure helpers: test_smolagents_unit.py.

The tests share the executor and run in file order; the last one cleans it up and checks nothing
of the VM is left.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import random
import ssl

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web
from cryptography.hazmat.primitives import serialization
from smolagents import ChatMessage, CodeAgent, MessageRole, Model, Tool

from egress_world import WHEEL_NAME, World
from host_helpers import helper_processes
from proxy_helpers import make_ca, make_leaf, write_pem

from capsem_kernel import loop_thread

pytestmark = pytest.mark.vm

PYPI_NAMES = ("pypi.org", "files.pythonhosted.org")
# a random loopback address per run: port 443 (pip's default index URL) without taking 127.0.0.1:443
INDEX_ADDR = "127.%d.%d.%d" % (random.randint(1, 254), random.randint(1, 254), random.randint(2, 254))
FILE_PATH = f"/packages/c4/5e/{WHEEL_NAME}"
ELSEWHERE, ELSEWHERE_WHEEL = "files.elsewhere.test.example", "capsem_elsewhere-1.0-py3-none-any.whl"
INDEX_SEEN: list[tuple[str, str]] = []  # (Host, path) of every request the local "PyPI" served


class PyPISimple(tornado.web.RequestHandler):
    """pypi.org's simple index and files.pythonhosted.org's files, for one project."""

    def initialize(self, wheel: bytes):
        self.wheel = wheel

    def get(self, path):
        INDEX_SEEN.append((self.request.host_name, self.request.path))
        sha = hashlib.sha256(self.wheel).hexdigest()
        if self.request.host_name == "pypi.org" and path.strip("/") == "simple/capsem-hello":
            self.write(f'<html><body><a href="https://files.pythonhosted.org{FILE_PATH}#sha256={sha}">'
                       f'{WHEEL_NAME}</a></body></html>')
        elif self.request.host_name == "pypi.org" and path.strip("/") == "simple/capsem-elsewhere":
            # a project whose file lives on a host no rule allows
            self.write(f'<html><body><a href="https://{ELSEWHERE}/{ELSEWHERE_WHEEL}#sha256={sha}">'
                       f'{ELSEWHERE_WHEEL}</a></body></html>')
        elif self.request.host_name == "files.pythonhosted.org" and "/" + path == FILE_PATH:
            self.set_header("Content-Type", "application/octet-stream")
            self.write(self.wheel)
        else:
            raise tornado.web.HTTPError(404)


def pypi_policy(w) -> str:
    """Called by World.create before the proxy starts: the local PyPI (its CA appended to the
    upstream trust the proxy gets) and the rules that allow reading it."""
    ca_key, ca_cert = make_ca("capsem test PyPI CA")
    key, leaf = make_leaf(ca_key, ca_cert, list(PYPI_NAMES), [INDEX_ADDR])
    cert_file, key_file = write_pem(w.tmp / "pypi.pem", cert=leaf), write_pem(w.tmp / "pypi.key", key=key)
    with open(w.upstream_ca, "ab") as f:
        f.write(ca_cert.public_bytes(serialization.Encoding.PEM))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    server = tornado.httpserver.HTTPServer(
        tornado.web.Application([(r"/(.*)", PyPISimple, {"wheel": w.wheel})]), ssl_options=ctx)
    server.add_sockets(tornado.netutil.bind_sockets(443, INDEX_ADDR))
    w.servers.append(server)  # World.close stops it
    return f"""
[[rule]]
name = "pypi-index"
host = "pypi.org"
port = 443
methods = ["GET"]
addresses = ["{INDEX_ADDR}"]
action = "allow"
reason = "the package index (a local stand-in), read-only"

[[rule]]
name = "pypi-files"
host = "files.pythonhosted.org"
port = 443
methods = ["GET"]
addresses = ["{INDEX_ADDR}"]
action = "allow"
reason = "package files (a local stand-in), read-only"
"""


class HelloTool(Tool):
    name = "hello_tool"
    description = "The greeting of the capsem_hello package."
    inputs = {}
    output_type = "string"

    def forward(self) -> str:
        import capsem_hello
        return capsem_hello.GREETING


class ScriptedModel(Model):
    """Answers each call with the next canned step; keeps what it was shown (the observations)."""

    def __init__(self, steps: list[str]):
        super().__init__(model_id="scripted")
        self.steps = list(steps)
        self.seen: list[str] = []

    def generate(self, messages, stop_sequences=None, **kwargs) -> ChatMessage:
        self.seen.append(repr(messages))
        assert self.steps, "the agent asked for more steps than the script has"
        return ChatMessage(role=MessageRole.ASSISTANT, content=self.steps.pop(0))


def code(body: str) -> str:
    return f"Thought: next step.\n<code>\n{body}\n</code>"


def run_agent(env, steps: list[str], tools=(), **run_kw):
    model = ScriptedModel([code(s) for s in steps])
    agent = CodeAgent(tools=list(tools), model=model, executor=env.executor, max_steps=len(steps) + 1,
                      verbosity_level=0)
    answer = agent.run("scripted task", **run_kw)
    actions = [s for s in agent.memory.steps if type(s).__name__ == "ActionStep"]
    return answer, actions, model


class Env:
    pass


@pytest.fixture(scope="module")
def env(image_dir, tmp_path_factory):
    from capsem_kernel.integrations.smolagents import CapsemExecutor
    tmp = tmp_path_factory.mktemp("smolagents")
    os.chmod(tmp, 0o755)
    mp = pytest.MonkeyPatch()
    e = Env()
    e.w = loop_thread.run_sync(World.create(tmp, extra_policy=pypi_policy,
                                            extra_resolve={n: INDEX_ADDR for n in PYPI_NAMES}), timeout=180)
    try:
        e.rt = tmp / "rt"
        e.rt.mkdir(mode=0o700)
        mp.setenv("CAPSEM_RUNTIME_DIR", str(e.rt))
        e.executor = CapsemExecutor(policy=e.w.policy_file, timeout=300)
        yield e
    finally:
        if hasattr(e, "executor"):
            e.executor.cleanup()
        loop_thread.run_sync(e.w.close(), timeout=60)
        mp.undo()


def test_tools_with_requirements_variables_and_final_answer(env):
    """The tool's requirement (capsem_hello, on no host path) is pip-installed in the VM from the
    local "PyPI" through the proxy; variables given to run() and set by one step are there in the
    next; final_answer ends the run with the value."""
    assert importlib.util.find_spec("capsem_hello") is None  # only the VM can have it
    answer, actions, _ = run_agent(env, [
        "x = start + 1\nprint('x is', x)",
        "greeting = hello_tool()\nprint(greeting)",
        "final_answer(f'{greeting} / {x * 2}')",
    ], tools=[HelloTool()], additional_args={"start": 20})
    assert answer == "hello from a wheel served by the test index / 42"
    assert "x is 21" in actions[0].observations
    assert "hello from a wheel served by the test index" in actions[1].observations
    assert not any(a.error for a in actions)
    assert ("pypi.org", "/simple/capsem-hello/") in INDEX_SEEN
    assert ("files.pythonhosted.org", FILE_PATH) in INDEX_SEEN
    rules = {(r["rule"], r["status"]) for r in env.executor.network if r["kind"] == "http"}
    assert {("pypi-index", 200), ("pypi-files", 200)} <= rules
    assert "capsem_hello" in env.executor.installed_packages


def test_errors_surface_and_the_state_survives(env):
    answer, actions, model = run_agent(env, [
        "y = 5\nraise ValueError('boom from the vm')",
        "final_answer(y + 1)",
    ])
    assert answer == 6
    err = str(actions[0].error)
    assert "ValueError" in err and "boom from the vm" in err
    assert "boom from the vm" in model.seen[1]  # what the model reads before its next step


def test_denied_requests_surface_with_the_refusal_reason(env):
    """A refused request is named in the observation with rule, code and reason, whether the code
    swallowed the 403 or died of it."""
    admin = f"https://api.test.example:{env.w.HTTPS}/admin/agent"
    blocked = f"http://blocked.test.example:{env.w.HTTP}/x"
    answer, actions, model = run_agent(env, [
        "import urllib.request, urllib.error\n"
        "for u in (" + repr(admin + "-caught") + ", " + repr(blocked) + "):\n"
        "    try:\n"
        "        urllib.request.urlopen(u, timeout=120)\n"
        "    except urllib.error.HTTPError as e:\n"
        "        print('status', e.code)",
        f"urllib.request.urlopen({admin + '-raised'!r}, timeout=120)",
        "final_answer('done')",
    ])
    assert answer == "done"
    caught = actions[0].observations
    assert "status 403" in caught and "refused by the sandbox policy" in caught
    assert f"{admin}-caught" in caught and "[admin, rule-deny]: admin is off limits" in caught
    assert "blocked.test.example" in caught and "default-deny" in caught
    raised = str(actions[1].error)
    assert "HTTPError" in raised and f"{admin}-raised" in raised and "admin is off limits" in raised
    assert "admin is off limits" in model.seen[1] and "admin is off limits" in model.seen[2]


def test_bang_pip_install_in_an_action(env):
    """The agent's own `!pip install` works in the kernel (PEP 668 lifted in the VM) and fetches
    through the proxy from the local "PyPI"."""
    before = len(INDEX_SEEN)
    answer, actions, _ = run_agent(env, [
        "!pip uninstall -y capsem-hello\n!pip install --no-cache-dir capsem-hello\n"
        "import importlib.metadata\nprint('version', importlib.metadata.version('capsem-hello'))",
        "final_answer('ok')",
    ])
    assert answer == "ok" and actions[0].error is None
    logs = actions[0].observations
    assert "Successfully installed capsem-hello-1.0" in logs and "version 1.0" in logs
    assert ("files.pythonhosted.org", FILE_PATH) in INDEX_SEEN[before:]


def test_an_install_the_policy_refuses_names_the_refusal(env):
    """pip fails because the file's host is refused: the error says so, with the reason."""
    from smolagents.utils import AgentError
    with pytest.raises(AgentError) as info:
        env.executor.install_packages(["capsem-elsewhere"])
    message = str(info.value)
    assert message.startswith("pip install capsem-elsewhere failed in the capsem sandbox (exit 1")
    assert "network requests refused by the sandbox policy" in message
    assert ELSEWHERE in message and "no rule allows this (default deny)" in message
    assert "capsem-elsewhere" not in env.executor.installed_packages


def test_cleanup_stops_the_vm(env):
    sandbox = env.executor.sandbox
    assert helper_processes(str(env.rt))
    env.executor.cleanup()
    assert not sandbox.is_alive()
    import time
    deadline = time.monotonic() + 30
    while helper_processes(str(env.rt)):
        assert time.monotonic() < deadline, helper_processes(str(env.rt))
        time.sleep(0.3)

"""Rich output through the capsem kernel's channels (one VM for the module): images, HTML, stdin,
clear_output, update_display_data, comms (both directions, with binary buffers), large output."""

import base64
import hashlib
import struct
import time

import pytest

from kernel_helpers import execute, run_ok, start_kernel, stdout_of, stop_kernel

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def kernel(capsem_kernelspecs, tmp_path_factory):
    km, kc = start_kernel(cwd=tmp_path_factory.mktemp("rich"))
    yield km, kc
    stop_kernel(km, kc)


def _ok(reply, outputs):
    errors = [m["content"] for m in outputs if m["msg_type"] == "error"]
    assert reply["content"]["status"] == "ok", (reply["content"], errors)
    return outputs


def test_matplotlib_inline_sends_a_png(kernel):
    _, kc = kernel
    outputs = _ok(*execute(kc, (
        "%matplotlib inline\n"
        "%config InlineBackend.print_figure_kwargs = {'bbox_inches': None}\n"  # exact size, not cropped
        "import matplotlib.pyplot as plt\n"
        "fig, ax = plt.subplots(figsize=(4, 2), dpi=50)\n"
        "ax.plot([0, 1, 2], [2, 0, 1])\n"
        "plt.show()")))
    images = [m for m in outputs if m["msg_type"] == "display_data"]
    assert len(images) == 1, outputs
    data = images[0]["content"]["data"]
    assert data["text/plain"].startswith("<Figure size 200x100 with 1 Axes>")
    png = base64.b64decode(data["image/png"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (200, 100)


def test_pandas_execute_result_is_html(kernel):
    _, kc = kernel
    outputs = _ok(*execute(kc, "import pandas as pd\npd.DataFrame({'animal': ['cat', 'dog'], 'legs': [4, 4]})"))
    results = [m for m in outputs if m["msg_type"] == "execute_result"]
    assert len(results) == 1
    html = results[0]["content"]["data"]["text/html"]
    assert "<table" in html and "<td>cat</td>" in html and "<th>legs</th>" in html
    assert "animal" in results[0]["content"]["data"]["text/plain"]


def test_stdin_input_and_getpass(kernel):
    _, kc = kernel
    prompts = []

    def answer(req):
        prompts.append((req["content"]["prompt"], req["content"]["password"]))
        return "secret-äö" if req["content"]["password"] else "Ada Lovelace"

    reply, outputs = execute(kc, (
        "import getpass\n"
        "name = input('your name? ')\n"
        "pw = getpass.getpass('password: ')\n"
        "print(f'hello {name}, {len(pw)} chars')"), allow_stdin=True, stdin_reply=answer)
    _ok(reply, outputs)
    assert prompts == [("your name? ", False), ("password: ", True)]
    assert stdout_of(outputs).endswith("hello Ada Lovelace, 9 chars\n")
    # Without allow_stdin, input() fails cleanly instead of hanging.
    reply, outputs = execute(kc, "input('x')", allow_stdin=False)
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "StdinNotImplementedError"


def test_clear_output_and_update_display(kernel):
    _, kc = kernel
    outputs = _ok(*execute(kc, (
        "from IPython.display import clear_output, display, HTML\n"
        "print('first')\n"
        "clear_output(wait=True)\n"
        "print('second')\n"
        "h = display(HTML('<i>v1</i>'), display_id='capsem-d')\n"
        "h.update(HTML('<i>v2</i>'))")))
    kinds = [m["msg_type"] for m in outputs]
    assert kinds == ["stream", "clear_output", "stream", "display_data", "update_display_data"], kinds
    assert outputs[1]["content"]["wait"] is True
    assert outputs[3]["content"]["transient"]["display_id"] == "capsem-d"
    assert outputs[4]["content"]["data"]["text/html"] == "<i>v2</i>"


COMM_OPEN = (
    "try:\n"
    "    from comm import create_comm\n"
    "except ImportError:  # older ipykernel: its own Comm\n"
    "    from ipykernel.comm import Comm as create_comm\n"
    "c = create_comm(target_name='capsem.test', data={'n': 1, 'text': 'größe ✓', 'nested': {'l': [1, 2.5, None, True]}},\n"
    "                metadata={'version': '2.1.0'}, buffers=[bytes(range(256)) * 4])\n"
    "c.send({'method': 'update', 'state': {'value': 42}}, buffers=[b'\\x00\\xff' * 1000, b''])\n"
    "print(c.comm_id)")


def test_comm_messages_from_the_kernel_arrive_unchanged(kernel):
    _, kc = kernel
    outputs = _ok(*execute(kc, COMM_OPEN))
    comm_id = stdout_of(outputs).strip()
    opens = [m for m in outputs if m["msg_type"] == "comm_open"]
    msgs = [m for m in outputs if m["msg_type"] == "comm_msg"]
    assert len(opens) == 1 and len(msgs) == 1, [m["msg_type"] for m in outputs]
    content = opens[0]["content"]
    assert (content["comm_id"], content["target_name"]) == (comm_id, "capsem.test")
    assert content["data"] == {"n": 1, "text": "größe ✓", "nested": {"l": [1, 2.5, None, True]}}
    assert set(content) <= {"comm_id", "target_name", "data", "target_module"}
    assert opens[0]["metadata"] == {"version": "2.1.0"}
    assert [bytes(b) for b in opens[0]["buffers"]] == [bytes(range(256)) * 4]
    assert msgs[0]["content"] == {"comm_id": comm_id, "data": {"method": "update", "state": {"value": 42}}}
    assert [bytes(b) for b in msgs[0]["buffers"]] == [b"\x00\xff" * 1000, b""]


def test_comm_messages_to_the_kernel_arrive_unchanged(kernel):
    """The front end opens a comm (as a widget manager does); the kernel echoes what it got."""
    _, kc = kernel
    run_ok(kc, (
        "import hashlib\n"
        "def _target(comm, open_msg):\n"
        "    comm.send({'got_open': open_msg['content']['data'],\n"
        "               'open_buffers': [hashlib.sha256(b).hexdigest() for b in open_msg['buffers']]})\n"
        "    @comm.on_msg\n"
        "    def _echo(msg):\n"
        "        comm.send({'echo': msg['content']['data']}, buffers=[bytes(b)[::-1] for b in msg['buffers']])\n"
        "get_ipython().kernel.comm_manager.register_target('capsem.echo', _target)"))
    comm_id = "capsem-comm-0001"
    big = bytes(range(256)) * 4096  # 1 MiB binary buffer
    session, sock = kc.session, kc.shell_channel.socket
    open_msg = session.msg("comm_open", {"comm_id": comm_id, "target_name": "capsem.echo",
                                         "data": {"hello": "wörld", "x": [1, {"y": None}]}})
    session.send(sock, open_msg, buffers=[big])
    msg = session.msg("comm_msg", {"comm_id": comm_id, "data": {"k": "v" * 1000}})
    session.send(sock, msg, buffers=[b"abc", big])
    got = []
    deadline = time.monotonic() + 120
    while len(got) < 2:
        assert time.monotonic() < deadline, got
        m = kc.get_iopub_msg(timeout=120)
        if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == comm_id:
            got.append(m)
    assert got[0]["content"]["data"] == {"got_open": {"hello": "wörld", "x": [1, {"y": None}]},
                                         "open_buffers": [hashlib.sha256(big).hexdigest()]}
    assert got[1]["content"]["data"] == {"echo": {"k": "v" * 1000}}
    assert [bytes(b) for b in got[1]["buffers"]] == [b"cba", big[::-1]]


def test_large_stdout_arrives_complete(kernel):
    _, kc = kernel
    t0 = time.monotonic()
    reply, outputs = execute(kc, (
        "import sys\n"
        "line = 'x' * 1023 + '\\n'\n"
        "for i in range(5 * 1024):\n"
        "    sys.stdout.write(line)\n"
        "print('end')"), timeout=300)
    _ok(reply, outputs)
    text = stdout_of(outputs)
    assert len(text) == 5 * 1024 * 1024 + 4 and text.endswith("x\nend\n")
    assert hashlib.sha256(text.encode()).hexdigest() == hashlib.sha256(
        (("x" * 1023 + "\n") * 5 * 1024 + "end\n").encode()).hexdigest()
    print(f"5 MiB of stdout in {time.monotonic() - t0:.1f} s")

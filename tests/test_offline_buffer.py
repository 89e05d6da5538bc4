"""CappedBuffer with real jupyter_client Sessions (signed wire messages): the cap, the reserve for
replies and status, and the signed note. The end-to-end test with a real server and capsem kernel
is tests/security/test_server_extension_limits.py."""

from __future__ import annotations

from jupyter_client.session import Session

from capsem_kernel.server.offline_buffer import CappedBuffer, message_size

KEY = b"k" * 32


def wire(session: Session, msg_type: str, content: dict, parent: dict | None = None) -> list[bytes]:
    return [b"kernel.x." + msg_type.encode()] + session.serialize(session.msg(msg_type, content=content, parent=parent or {}))


def test_cap_reserve_and_a_signed_note_where_output_was_dropped():
    kernel, client = Session(key=KEY), Session(key=KEY)
    request = client.msg("execute_request", content={"code": "flood()"})
    buf = CappedBuffer(1 << 20, "kid")
    chunk = {"name": "stdout", "text": "x" * 65536}
    for _ in range(64):  # 4 MiB of output for a 1 MiB cap
        buf.append(("iopub", wire(kernel, "stream", chunk, request["header"])))
    kept_output = len(buf)
    buf.append(("iopub", wire(kernel, "status", {"execution_state": "idle"}, request["header"])))
    buf.append(("shell", wire(kernel, "execute_reply", {"status": "ok"}, request["header"])))
    assert buf.size <= buf.cap + buf.reserve and sum(message_size(p) for _, p in buf) == buf.size
    assert 10 <= kept_output <= 16 and buf.dropped == 64 - kept_output
    assert [c for c, _ in buf[-2:]] == ["iopub", "shell"]  # the end of the cell still reaches the client
    buf.add_note(kernel)
    channel, parts = buf[0]  # first: jupyter_server's replay rate limit could swallow a later note
    assert channel == "iopub"
    _, fed = client.feed_identities(parts)
    note = client.deserialize(fed)  # signed with the kernel's key: a client accepts it
    assert note["msg_type"] == "stream" and note["content"]["name"] == "stderr"
    assert f"{buf.dropped} message(s)" in note["content"]["text"] and "dropped" in note["content"]["text"]
    assert f"the {kept_output} message(s) before the first drop follow" in note["content"]["text"]
    assert note["parent_header"]["msg_id"] == request["header"]["msg_id"]  # shown in the flooding cell
    buf.add_note(kernel)
    assert len(buf) == kept_output + 3  # once


def test_a_flood_of_replies_or_status_is_capped_too():
    kernel = Session(key=KEY)
    buf = CappedBuffer(1 << 20, "kid")
    for _ in range(20000):
        buf.append(("shell", wire(kernel, "execute_reply", {"status": "ok", "pad": "y" * 200})))
    assert buf.size <= buf.cap + buf.reserve and buf.dropped > 0


def test_a_hostile_frame_layout_is_counted_not_parsed():
    buf = CappedBuffer(1 << 20, "kid")
    for parts in ([b"x" * 70000] * 20, [b"<IDS|MSG>"], [b"<IDS|MSG>", b"s", b"{" * 10000, b"[", b"", b""],
                  [b"<IDS|MSG>", b"s", b'{"msg_type": "status"}', b"\xff", b"", b""] * 3000):
        buf.append(("iopub", parts))
    assert buf.size <= buf.cap + buf.reserve
    buf.add_note(Session(key=KEY))

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


def test_headers_nested_deep_within_the_parse_bound_never_raise():
    """A header or parent header of at most HEADER_PARSE_MAX bytes can still nest ~2000 deep:
    json.loads raises RecursionError (not a ValueError) on it. The guest kernel chooses these bytes;
    before, append() raised into jupyter_server's ZMQ callback (a traceback logged per message, the
    message neither kept nor counted) and add_note() raised on reconnect (no replay)."""
    from capsem_kernel.server.offline_buffer import HEADER_PARSE_MAX
    buf = CappedBuffer(1 << 20, "kid")
    while buf.size + 10000 <= buf.cap:  # up to the cap: what follows is parsed
        buf.append(("iopub", [b"x" * 1000]))
    before = buf.dropped + len(buf)
    for deep in (b"[" * (HEADER_PARSE_MAX // 2) + b"]" * (HEADER_PARSE_MAX // 2),
                 b'{"msg_type":' + b"[" * 1500 + b"]" * 1500 + b"}"):
        assert len(deep) <= HEADER_PARSE_MAX
        buf.append(("iopub", [b"<IDS|MSG>", b"sig", deep, deep, b"{}", b"{}"]))
    assert buf.dropped + len(buf) == before + 2 and buf.dropped and buf.size <= buf.cap + buf.reserve
    buf.add_note(Session(key=KEY))
    assert buf[0][0] == "iopub"

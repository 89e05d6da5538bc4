"""Where a credential's secret may land in a request (pure: bytes in, bytes out; no mitmproxy).

The guest chooses everything it sends, so the secret goes only where the credential declares:
- `header`: that header is set to `format` with the secret (whatever the guest sent in it);
- `query`: the value of each query parameter of exactly that name whose value is exactly the
  placeholder. Spelled any other way (percent-encoded, inside another value, in a `;`
  parameter, after a `#`) it is not that parameter for every server, so it is left alone.
Everywhere else (other headers, cookies, the path, other parameters, the body, trailers) the
placeholder goes out as the guest wrote it.
"""

from __future__ import annotations

from urllib.parse import quote


def query_value(secret: str) -> bytes:
    """The secret as a query parameter value: percent-encoded so it stays one value."""
    return quote(secret, safe="-._~").encode()


def place_in_query(target: bytes, name: bytes, placeholder: bytes, value: bytes) -> tuple[bytes, int]:
    """`target` (a request target: path and query) with `value` in place of the placeholder in the
    declared parameter `name`; and how many parameters were filled."""
    path, sep, query = target.partition(b"?")
    if not sep or b"#" in target:
        return target, 0  # no query; or a fragment, which servers cut in different places
    wanted = name + b"=" + placeholder
    params = query.split(b"&")
    filled = 0
    for i, p in enumerate(params):
        if p == wanted:
            params[i] = name + b"=" + value
            filled += 1
    if not filled:
        return target, 0
    return path + b"?" + b"&".join(params), filled

"""mitmproxy addons of the proxy service, one concern each (import only inside the service process:
they import mitmproxy).

    auth.KernelAuth       SOCKS5 user/password = registered kernel; attributes connections
    limits.Limits         header deadline (slow loris), HTTP/1 header size cap
    guard.Guard           the policy: connections, addresses, SNI/Host, requests, WebSocket, TCP
    credentials.Credentials  inject host secrets, scrub them from responses
    streams.Streams       stream bodies, count bytes, keep message lists empty
    audit.Audit           SQLite rows for every decision and exchange
"""

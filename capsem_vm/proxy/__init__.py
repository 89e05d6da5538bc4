"""Host side of guest egress: every byte the guest sends out passes through here.

    guest --vsock 5003--> EgressBridge (DNS: policy + synthetic addresses)         [VM owner process]
    guest --vsock 5002--> EgressBridge --SOCKS5 user/pw--> proxy service (mitmproxy + addons) --> internet
                                                            [own process, own venv: server.py]

Modules: bridge (EgressBridge), service (ProxyService: start/stop/register), ca (ca_cert_pem),
audit (AuditLog, read_events), dns / dns_responder / synthetic (sans-IO DNS), socks5 (client),
server + addons/ + mitm_patches (the service process; only these import mitmproxy; every patch of
mitmproxy internals is in mitm_patches, behind its version gate), cli (`capsem audit`, `capsem proxy`).
"""

from .audit import AuditLog, read_events
from .bridge import EgressBridge
from .ca import ca_cert_pem, ensure_ca
from .service import ProxyEndpoint, ProxyService, ProxyServiceError

__all__ = ["AuditLog", "EgressBridge", "ProxyEndpoint", "ProxyService", "ProxyServiceError", "ca_cert_pem",
           "ensure_ca", "read_events"]

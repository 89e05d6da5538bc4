"""Remote kernels: per-kernel TLS identities (identity.py), the tunnel's wire format (wire.py)
and the mutual-TLS tunnel carrying a kernel's five ZMQ channels and a control connection between
a front end and a node (tunnel.py). Nothing here imports Ray: what crosses Ray is only public
material (certificates, fingerprints, addresses); everything secret travels inside the tunnel."""

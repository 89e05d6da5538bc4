"""Capsem kernels placed on a Ray cluster (issue 18; optional extra `capsem-jupyter[ray]`).

- node.py: the `CapsemNode` actor, one per kernel, on a node that advertises the `capsem`
  resource: boots the kernel's VM there with the node's own capsem machinery and serves its
  channels over the mutual-TLS tunnel (capsem_kernel/remote/).
- remote_kernel.py: the front end's side of one such kernel (the KernelVM stand-in the
  provisioner, the Sandbox and the server extension use).
- provisioner.py: RayCapsemProvisioner (`capsem kernel install --ray ADDRESS`).
- placement.py: connecting to Ray, placing the actor with a bounded wait, the folder check.
- audit_rows.py: the node's audit rows of a kernel, carried to the front end's database.

Only public material crosses Ray (certificates, addresses, names, ids); the key, the policy text
and file contents travel inside the TLS control connection.
"""

"""Warm VM pool: VMs booted ahead of time (agent up, ipykernel imported, no share, no key, no
policy), claimed by kernels one each, never reused.

Modules, one job each:
  wire.py      pure: messages, flavours, which VM a claim gets, how many VMs to boot (budget)
  seqpacket.py one message per SOCK_SEQPACKET datagram, fds by SCM_RIGHTS, peer credentials
  keeper.py    the process owning one pooled VM; lives while its owner socket has a peer
  service.py   the per-user pool service (`capsem pool start`): boots keepers, serves claims
  client.py    claim/status/stop from the claimer's side
  claimed.py   ClaimedVM: what is decided per kernel, at claim time (share hotplug, egress, ...)
  cli.py       `capsem pool start|stop|status`

Who owns a pooled VM (why a claimed kernel survives the pool): QEMU and its helpers are children
of a per-VM keeper process (PDEATHSIG to the keeper), not of the pool. The keeper has one end of
a socketpair and tears its VM down when the other end, the *owner end*, closes. The pool holds the
owner ends of unclaimed VMs (so they die with the pool); a claim passes the owner end to the
claimer over the pool socket (SCM_RIGHTS) and the pool closes its copy. From then on the VM lives
exactly as long as the claimer holds it, whatever happens to the pool. The agent's control
connection moves the same way: the claimer asks the keeper for it (`handover`), the keeper stops
reading it and sends its fd; QEMU's QMP socket and the vsock sockets are paths in the VM's 0700
runtime dir, which belongs to the same user.
"""
